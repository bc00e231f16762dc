"""Expert tuning: re-balance a (folded) Grouter on the target data (docs/method.md#expert-tuning).

The source's routing distribution is not the target corpus's, so a folded Grouter is unbalanced
there. Everything but the final linear layer stays frozen; the head is trained with the
Switch/GShard load-balancing loss alone, ``E · Σ f_i · P_i`` (1 at perfect balance), on a small
amount of target data. ``keep`` adds a penalty, ``keep · KL(untuned || tuned)`` per token, that
holds the head near the untuned Grouter's routing: balance bought with fewer rewritten routes.
``method="bias"`` instead nudges a selection-only bias by the sign rule (no gradient; the head is
untouched). The report measures, on held-out data, MaxVio before and
after and how much of the routing survived (top-k set agreement with the untuned Grouter).

Per-layer heads are tuned together, each head against its own balance: the loss is the mean over
heads of each head's load-balancing loss, and the bias method keeps a bias per head. The report
gives each head's figures (``*_per_head``) and their mean.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import write_json
from .chunking import batches_of
from .device import resolve_device
from .errors import GrouterError
from .formats.dataset import DataSplit, PackedDataset
from .losses import kl_loss
from .losses import load_balancing_loss
from .metrics import max_vio, topk_recall, topk_set_agreement
from .network import Grouter
from .options import LEARNING_RATE, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, option, path_input
from .plots import per_head_paths, plot_loads
from .routers import expert_counts_per_head
from .runner import Output, Stage

METHODS = ("gradient", "bias")


@dataclass
class Inputs:
    grouter: Path = path_input("the (folded) Grouter to tune")
    data: Path = path_input("the target's data")


@dataclass
class Options:
    tokens: int = option(1_000_000, "target tokens to tune on (the paper: 50M of 30B)", range=POSITIVE_INT, memory=True)
    method: str = option("gradient", "gradient: train the head with the load-balancing loss; bias: selection bias "
                         "by the sign rule", choices=METHODS)
    # on the embedded corpus: 1e-3 balances too little, 1e-2 rewrites most routes
    lr: float = option(3e-3, range=LEARNING_RATE)
    bias_gamma: float = option(1e-2, range=POSITIVE)
    keep: float = option(0.0, "gradient method: add WEIGHT · KL(untuned || tuned) per token, keeping more of the "
                         "untuned routing for less balance (default 0: balance only)", range=NON_NEGATIVE,
                         metavar="WEIGHT")
    batch_size: int = option(16, range=POSITIVE_INT, memory=True)
    domain: str | None = option(None, "tune and evaluate on one domain of the data only")
    eval_sequences: int = option(512, "held-out sequences for the before/after report", range=POSITIVE_INT, memory=True)
    seed: int = option(0, range=SEED)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", how=True)


def domain_sequences(split: DataSplit, domain: str | None) -> np.ndarray:
    if domain is None:
        return np.arange(len(split))
    if domain not in split.domains:
        raise GrouterError(f"unknown domain {domain!r}; the dataset has {', '.join(split.domains)}")
    idx = np.flatnonzero(split.domain_ids() == split.domains.index(domain))
    if len(idx) == 0:
        raise GrouterError(f"the {split.name} split has no {domain!r} sequences")
    return idx


@torch.no_grad()
def routing_report(grouter: Grouter, split: DataSplit, idx: np.ndarray, batch_size: int, device) -> dict:
    """Per-batch MaxVio (mean), MaxVioGlobal, expert loads and the routed ids on ``idx``; with
    per-layer heads the MaxVios are means over heads, each head's in ``*_per_head``, loads ``[H, E]``."""
    E, H = grouter.cfg.n_experts, grouter.cfg.n_routing_heads
    total = np.zeros((H, E), dtype=np.int64)
    batch_vio, all_ids = [], []
    for chunk in batches_of(idx, batch_size):
        ids = grouter.route(split.batch(chunk)["input_ids"].to(device)).ids
        loads = expert_counts_per_head(ids, E, H).cpu().numpy()
        total += loads
        batch_vio.append(max_vio(loads))
        all_ids.append(ids.cpu())
    per_head = {"max_vio_batch_mean": [float(np.mean([v[h] for v in batch_vio])) for h in range(H)],
                "max_vio_global": max_vio(total).tolist()}
    out = {key: float(np.mean(v)) for key, v in per_head.items()}
    if H > 1:
        out.update({f"{key}_per_head": v for key, v in per_head.items()})
    return {**out, "load": (total if H > 1 else total[0]).tolist(), "ids": torch.cat(all_ids)}


def _heads(t: torch.Tensor, grouter: Grouter) -> list[torch.Tensor]:
    """``t`` (``[..., H, x]``) per head; itself for a shared head."""
    return list(t.unbind(-2)) if grouter.cfg.heads is not None else [t]


def freeze_all_but_head(grouter: Grouter) -> None:
    for name, p in grouter.named_parameters():
        p.requires_grad_(name == "head.weight")


def tune_grouter(grouter: Grouter, split: DataSplit, cfg: Options, device, progress: bool = True) -> Grouter:
    """Return a tuned copy; only ``head.weight`` (gradient) or ``selection_bias`` (bias) changes."""
    tuned = copy.deepcopy(grouter).to(device).eval()  # eval: no dropout; the head still gets gradients
    freeze_all_but_head(tuned)
    untuned = copy.deepcopy(tuned) if cfg.keep else None  # the routing the keep term holds on to
    pool = domain_sequences(split, cfg.domain)
    steps = max(1, math.ceil(cfg.tokens / (cfg.batch_size * split.seq_len)))
    order = np.random.default_rng(cfg.seed).permutation(np.resize(pool, max(len(pool), steps * cfg.batch_size)))
    opt = torch.optim.AdamW([tuned.head.weight], lr=cfg.lr, weight_decay=0.0) if cfg.method == "gradient" else None
    for step in tqdm(range(steps), desc=f"tune ({cfg.method})", disable=not progress, mininterval=2):
        decay = 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to zero: settle, don't oscillate
        batch = split.batch(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])["input_ids"].to(device)
        with torch.no_grad():
            hidden = tuned.encode(batch)  # the frozen encoder needs no graph
        if opt is not None:
            opt.param_groups[0]["lr"] = cfg.lr * decay
            opt.zero_grad(set_to_none=True)
            tuning_loss(tuned, hidden, untuned, cfg.keep).backward()
            opt.step()
        else:
            nudge_bias(tuned, hidden, cfg.bias_gamma * decay)
    for p in tuned.parameters():
        p.requires_grad_(True)
    return tuned.eval()


def tuning_loss(tuned: Grouter, hidden: torch.Tensor, untuned: Grouter | None, keep: float) -> torch.Tensor:
    """Each head's load-balancing loss, averaged over heads; plus ``keep · KL(untuned || tuned)``."""
    E = tuned.cfg.n_experts
    logits = tuned.logits_from_hidden(hidden)
    ids = tuned.route_logits(logits.detach()).ids
    loss = torch.stack([load_balancing_loss(x, i, E) for x, i in zip(_heads(logits, tuned), _heads(ids, tuned))])
    loss = loss.mean()  # each head balanced on its own
    if untuned is not None:
        with torch.no_grad():
            reference = untuned.logits_from_hidden(hidden)
        loss = loss + keep * kl_loss(reference, logits)  # mean over tokens and heads
    return loss


@torch.no_grad()
def nudge_bias(tuned: Grouter, hidden: torch.Tensor, gamma: float) -> None:
    """The sign rule on the selection bias: over-used experts become less likely to be chosen."""
    ids = tuned.route_logits(tuned.logits_from_hidden(hidden)).ids
    counts = expert_counts_per_head(ids, tuned.cfg.n_experts, tuned.cfg.n_routing_heads).float()
    counts = counts.view(tuned.selection_bias.shape)
    tuned.selection_bias += gamma * torch.sign(counts.mean(-1, keepdim=True) - counts)


def run(inputs: Inputs, cfg: Options, out: Output) -> dict:
    """Tune the Grouter on the data; writes the tuned Grouter and a before/after report."""
    if cfg.keep and cfg.method != "gradient":
        raise GrouterError("--keep weighs a loss term: it needs --method gradient")
    device = resolve_device(cfg.device)
    data = PackedDataset.open(inputs.data)
    grouter = Grouter.from_pretrained(inputs.grouter).to(device)
    grouter.check_data(data)
    train_split, val_split = data.split("train"), data.split("val")
    held_out = domain_sequences(val_split, cfg.domain)[: cfg.eval_sequences]
    before = routing_report(grouter, val_split, held_out, cfg.batch_size, device)
    tuned = tune_grouter(grouter, train_split, cfg, device, out.progress)
    after = routing_report(tuned, val_split, held_out, cfg.batch_size, device)
    tuned.cfg.provenance = {**tuned.cfg.provenance, "tune": {**asdict(cfg), "device": None, "data": data.fingerprint}}
    report = {
        "method": cfg.method, "tokens": cfg.tokens, "domain": cfg.domain, "keep": cfg.keep, "held_out_sequences": len(held_out),
        "before": {k: v for k, v in before.items() if k != "ids"},
        "after": {k: v for k, v in after.items() if k != "ids"},
        "max_vio_global_ratio": after["max_vio_global"] / max(before["max_vio_global"], 1e-12),
        "topk_set_agreement_with_untuned": topk_set_agreement(before["ids"], after["ids"]),
        "topk_overlap_with_untuned": topk_recall(before["ids"], after["ids"]),
    }
    with out.atomic() as tmp:
        tuned.cpu().save_pretrained(tmp)
        write_json(tmp / "tune_report.json", report)
        (tmp / "tune_report.md").write_text(tune_markdown(report))
        _plot_loads(before, after, tuned.cfg.heads, tmp / "loads.png", cfg.domain)
    return {"grouter": str(out.path), "max_vio_global_before": before["max_vio_global"],
            "max_vio_global_after": after["max_vio_global"],
            "max_vio_batch_mean_before": before["max_vio_batch_mean"],
            "max_vio_batch_mean_after": after["max_vio_batch_mean"],
            "topk_set_agreement_with_untuned": report["topk_set_agreement_with_untuned"],
            "topk_overlap_with_untuned": report["topk_overlap_with_untuned"],
            **({"head_layers": tuned.cfg.head_layers} if tuned.cfg.head_layers else {})}


def _plot_loads(before: dict, after: dict, heads, path: Path, domain: str | None) -> None:
    """``loads.png``: expert loads before and after tuning; one plot per head (``loads_layer{l}.png``)."""
    pairs = zip(before["load"], after["load"]) if heads else [(before["load"], after["load"])]
    for file, (b, a), label in zip(per_head_paths(path, heads), pairs, heads.labels if heads else [None]):
        head = "" if label is None else f", head of source {label}"
        plot_loads({"before tuning": np.array(b), "after tuning": np.array(a)}, file,
                   title=f"expert load on held-out data ({domain or 'all domains'}{head})")


def tune_markdown(r: dict) -> str:
    b, a = r["before"], r["after"]
    keep = f", keep {r['keep']:g}" if r.get("keep") else ""
    return (f"# Expert tuning ({r['method']}{keep}, {r['tokens']:,} tokens, domain: {r['domain'] or 'all'})\n\n"
            f"Held-out sequences: {r['held_out_sequences']}\n\n"
            "| | before | after |\n|---|---|---|\n"
            f"| MaxVioGlobal | {b['max_vio_global']:.3f} | {a['max_vio_global']:.3f} |\n"
            f"| mean per-batch MaxVio | {b['max_vio_batch_mean']:.3f} | {a['max_vio_batch_mean']:.3f} |\n"
            + "".join(f"| MaxVioGlobal, head {h} | {x:.3f} | {y:.3f} |\n"
                      for h, (x, y) in enumerate(zip(b.get("max_vio_global_per_head", []),
                                                     a.get("max_vio_global_per_head", []))))
            + "\n"
            f"Routing kept from the untuned Grouter: identical top-k set for "
            f"{r['topk_set_agreement_with_untuned']:.1%} of tokens; {r['topk_overlap_with_untuned']:.1%} of the "
            "untuned top-k experts still chosen\n")


tune = Stage("tune", run, Inputs, Options)
