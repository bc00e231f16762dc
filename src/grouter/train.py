"""Training the built-in MoE LM (source models, baselines, Grouter-routed targets).

The loop, run directory and resume are :mod:`grouter.loop`'s; this module adds what is particular
to the MoE LM: routing supplied with the batch (stored or computed online by a Grouter), expert
loads per step, validation per domain and routing probes for the consistency metric.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .chunking import batches_of
from .device import check_fits, resolve_device
from .errors import GrouterError
from .formats.dataset import DataSplit, PackedDataset
from .formats.run import read_metrics
from .formats.store import RoutingStore
from .loop import Hooks, Step, TrainConfig, build_optimizer, fit, prefetch
from .metrics import grad_norm_cv, max_vio
from .model import ModelOptions, MoEConfig, MoELM
from .network import Grouter
from .options import POSITIVE_INT, option, path_input
from .routers import ROUTER_KINDS, Heads, Routing
from .runner import Output, Stage

# Routing supplied with the batch for ``router="external"``: (split name, sequence indices) ->
# Routing with ids/weights [B, L, k] aligned with the batch's input tokens ([B, L, H, k] with
# per-layer heads: each layer of the model takes its head's).
RoutingSource = Callable[[str, np.ndarray], Routing]


@torch.no_grad()
def evaluate(model: MoELM, split: DataSplit, cfg: TrainConfig, device: torch.device,
             routing_source: RoutingSource | None) -> dict:
    """Mean next-token loss per domain on a fixed subset of the split (first N sequences each)."""
    was_training = model.training
    model.eval()
    domain_ids = split.domain_ids()
    result: dict[str, float] = {}
    total_loss, total_tokens = 0.0, 0
    for d, name in enumerate(split.domains):
        idx = np.flatnonzero(domain_ids == d)[: cfg.eval_sequences]
        if len(idx) == 0:
            continue
        loss_sum, tokens = 0.0, 0
        for chunk in batches_of(idx, cfg.batch_size):
            batch = split.batch(chunk)
            routing = routing_source(split.name, chunk).to(device) if routing_source else None
            out = model(batch["input_ids"].to(device), routing=routing)
            labels = batch["labels"].to(device)
            loss_sum += F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), reduction="sum").item()
            tokens += labels.numel()
        result[name] = loss_sum / tokens
        total_loss, total_tokens = total_loss + loss_sum, total_tokens + tokens
    model.train(was_training)
    return {"val_loss": total_loss / max(total_tokens, 1), "val_loss_by_domain": result}


PROBE_SEQUENCES = 8  # validation sequences whose routing is saved at every evaluation


@torch.no_grad()
def save_routing_probe(model: MoELM, split: DataSplit, device: torch.device,
                       routing_source: RoutingSource | None, path: Path) -> None:
    """Every layer's chosen experts on a fixed validation batch: successive probes give the
    routing consistency of a run (paper Fig. 1a) without keeping every checkpoint."""
    was_training = model.training
    model.eval()
    idx = np.arange(min(PROBE_SEQUENCES, len(split)))
    routing = routing_source(split.name, idx).to(device) if routing_source else None
    ids = model(split.batch(idx)["input_ids"].to(device), routing=routing).routing_ids
    model.train(was_training)
    path.parent.mkdir(exist_ok=True)
    np.save(path, ids.cpu().numpy().astype(np.uint16))


def _heads_identity(heads: Heads | None) -> dict:
    """Per-layer heads in a run's routing identity (nothing for one head: identities stay as they were)."""
    return {} if heads is None else {"head_layers": list(heads.layers), "source_layers": heads.source_layers}


def external_routing(data: PackedDataset, routing_dir: str | Path | None = None, grouter_dir: str | Path | None = None,
                     device: str = "auto") -> tuple[RoutingSource, dict, int, int]:
    """Routing for ``router="external"``: a routing store (read, no router compute) or a Grouter
    run online each step. Returns (source, identity, n_experts, k)."""
    if routing_dir is not None:
        store = RoutingStore.open(routing_dir, data=data)
        m = store.manifest
        identity = {"kind": "store", "grouter_fingerprint": m["grouter_fingerprint"], "k": store.k,
                    "weights_dtype": m["weights_dtype"], "causal": m["causal"], **_heads_identity(store.heads)}
        return store.routing, identity, store.n_experts, store.k
    dev = resolve_device(device)
    grouter = Grouter.from_pretrained(grouter_dir).to(dev)
    grouter.check_data(data)

    def online(split: str, idx: np.ndarray) -> Routing:
        return grouter.route(data.split(split).batch(idx)["input_ids"].to(dev))

    identity = {"kind": "online", "grouter_fingerprint": grouter.fingerprint(), "k": grouter.cfg.top_k,
                "causal": grouter.cfg.causal, **_heads_identity(grouter.cfg.heads)}
    return online, identity, grouter.cfg.n_experts, grouter.cfg.top_k


def _with_layer_heads(identity: dict | None, n_layers: int) -> dict | None:
    """Per-layer routing's identity with ``layer_heads``, the head each of the model's layers routes by."""
    if not identity or "head_layers" not in identity:
        return identity
    heads = Heads(tuple(identity["head_layers"]), identity["source_layers"])
    return {**identity, "layer_heads": list(heads.for_target(n_layers))}


def check_vocab(model_cfg: MoEConfig, data: PackedDataset) -> None:
    if model_cfg.vocab_size != data.vocab_size:
        raise GrouterError(f"the model's vocabulary ({model_cfg.vocab_size}) differs from the dataset's "
                           f"({data.vocab_size}): the data was tokenized with another tokenizer; "
                           "re-tokenize it with the model's tokenizer")


def check_inputs(data: PackedDataset, model_cfg: MoEConfig, cfg: TrainConfig,
                 routing_source: RoutingSource | None) -> None:
    cfg.validate()
    model_cfg.validate()
    check_vocab(model_cfg, data)
    if model_cfg.max_seq_len < data.seq_len:
        raise GrouterError(f"model max_seq_len {model_cfg.max_seq_len} is shorter than the data's seq_len {data.seq_len}")
    if (model_cfg.router == "external") != (routing_source is not None):
        raise GrouterError("external routing needs a routing source (--routing), and only it does")
    if cfg.batch_size > len(data.split("train")):
        raise GrouterError(f"batch size {cfg.batch_size} exceeds the {len(data.split('train'))} training sequences")
    if len(data.split("val")) == 0:
        raise GrouterError(f"dataset {data.path} has no validation sequences to evaluate on; pack it with a larger "
                           "--val-fraction or more text")
    # logits dominate the activations: [batch, seq, vocab] float32, kept for the backward, about 3 times
    logits = 3 * 4 * cfg.batch_size * data.seq_len * model_cfg.vocab_size
    check_fits(model_cfg.num_parameters(), logits, resolve_device(cfg.device), "this model")


BASELINE_ROUTERS = tuple(r for r in ROUTER_KINDS if r != "external")
ROUTER_HELP = ("aux: learned + load-balancing loss; zloss: + z-loss; auxfree: bias balancing; hash: balanced token-id "
               "table; random: frozen random; stablemoe: learned, then distilled and frozen; none: learned, no balancing")


@dataclass
class SourceInputs:
    data: Path = path_input("packed dataset")


@dataclass
class Inputs(SourceInputs):
    # one of these or --router (an option): where the target's routing comes from
    routing: Path | None = path_input("a routing store from `grouter dispatch` (no router compute)",
                                      exclusive="routing")
    grouter: Path | None = path_input("a Grouter, routing computed online every step", exclusive="routing")


@dataclass
class Options:
    router: str | None = option(None, ROUTER_HELP, choices=BASELINE_ROUTERS, exclusive="routing")
    model: ModelOptions = field(default_factory=ModelOptions)
    schedule: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300))
    stop_after: int | None = option(None, "leave after this step, as an interruption would", range=POSITIVE_INT,
                                    cli=False, how=True)


@dataclass
class SourceOptions(Options):
    router: str = option("aux", "the source's router: " + ROUTER_HELP, choices=BASELINE_ROUTERS)


def run(inputs: SourceInputs, o: Options, out: Output) -> dict:
    """Train a target (a baseline router, or Grouter routing stored or online) or a source MoE."""
    data = PackedDataset.open(inputs.data)
    stored, online = getattr(inputs, "routing", None), getattr(inputs, "grouter", None)
    if (o.router is None) == (stored is None and online is None):
        raise GrouterError("pass one of --routing, --grouter (Grouter routing) or --router (a baseline)")
    if o.router is not None:
        model_cfg = o.model.config(data.vocab_size, data.seq_len, o.router, o.schedule.seed)
        return train_model(data, out, model_cfg, o.schedule, stop_after=o.stop_after)
    source, identity, n_experts, k = external_routing(data, stored, online, o.schedule.device)
    for flag, value, needed in (("--experts", o.model.n_experts, n_experts), ("--top-k", o.model.top_k, k)):
        if value is not None and value != needed:
            raise GrouterError(f"{flag} {value} contradicts the routing ({needed}); leave it out")
    model = replace(o.model, n_experts=n_experts, top_k=k)
    model_cfg = model.config(data.vocab_size, data.seq_len, "external", o.schedule.seed)
    return train_model(data, out, model_cfg, o.schedule, routing_source=source, routing_identity=identity,
                       stop_after=o.stop_after)


def train_model(data: PackedDataset, out: Output, model_cfg: MoEConfig, cfg: TrainConfig,
                routing_source: RoutingSource | None = None, routing_identity: dict | None = None,
                stop_after: int | None = None) -> dict:
    """Train (or resume) a run in ``out.path``; returns its summary.

    ``routing_identity`` names where external routing comes from (store or Grouter fingerprint),
    so a run is never resumed with other routing. ``stop_after`` ends the process early at that
    step (after checkpointing), which is how the resume tests simulate an interruption.
    """
    if model_cfg.router == "stablemoe" and model_cfg.stablemoe_stage1_steps == 0:  # the paper's 10 % of the run
        model_cfg = replace(model_cfg, stablemoe_stage1_steps=max(1, math.ceil(0.1 * cfg.steps)))
    check_inputs(data, model_cfg, cfg, routing_source)
    routing_identity = _with_layer_heads(routing_identity, model_cfg.n_layers)
    schedule = {k: v for k, v in asdict(cfg).items() if k != "device"}  # where it runs is not what it is
    identity = {"model": asdict(model_cfg), "train": schedule, "data_fingerprint": data.fingerprint,
                "routing": routing_identity}
    run = out.run(identity)
    resume_state = run.start()
    path = out.path

    device = resolve_device(cfg.device)
    train_split, val_split = data.split("train"), data.split("val")
    model = new_model(model_cfg, train_split, cfg.seed).to(device).train()
    opt = build_optimizer(model, cfg)
    start = run.resume(model, opt, resume_state)
    totals = RunTotals.restore(resume_state, model_cfg)
    tokens_per_step = cfg.batch_size * data.seq_len

    def batches():
        """Everything a step needs that does not depend on the model: gathered in the background."""
        for step in range(start, cfg.steps):
            idx = train_split.batch_indices(step, cfg.batch_size, cfg.seed)
            routing = routing_source("train", idx) if routing_source else None
            if routing is not None and routing.order is None:
                routing = routing.grouped(model_cfg.n_experts)  # once per batch, not once per layer
            yield step, (step, train_split.batch(idx), routing)

    def forward(item) -> Step:
        step, batch, routing = item
        result = model(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                       routing=routing.to(device) if routing is not None else None)
        loads = result.expert_counts.cpu().numpy()
        return Step(result.loss, {"tokens": (step + 1) * tokens_per_step, "loss": result.lm_loss.item(),
                                  "aux_loss": result.aux_loss.item(), "max_vio": float(max_vio(loads).mean()),
                                  "expert_load": loads.tolist()})

    def after_step(record: dict) -> None:
        model.after_optimizer_step()
        totals.add(record)

    def validate(step: int) -> dict:
        save_routing_probe(model, val_split, device, routing_source, path / "probes" / f"step_{step:08d}.npy")
        return {"tokens": step * tokens_per_step, **evaluate(model, val_split, cfg, device, routing_source)}

    t0 = time.perf_counter()
    hooks = Hooks(forward, evaluate=validate, state=totals.state, after_step=after_step, extra=checkpoint_extra(data))
    finished = fit(run, model, opt, cfg, start, prefetch(batches()), hooks, f"train {path.name}", out.progress,
                   stop_after)
    if not finished:
        return {"out": str(path), "stopped_at": stop_after}
    timed = (cfg.steps - start) * tokens_per_step
    summary = {**summarize(run.metrics_path, totals.loads, totals.grad_norms), "out": str(path), "steps": cfg.steps,
               "tokens": cfg.steps * tokens_per_step,
               "tokens_per_second": timed / (time.perf_counter() - t0) if timed else None,
               "parameters": model.num_parameters(), "active_parameters": model.num_parameters(active_only=True),
               **{k: v for k, v in (routing_identity or {}).items() if k == "layer_heads"}}
    run.finish(summary)
    return summary


def new_model(model_cfg: MoEConfig, train_split: DataSplit, seed: int) -> MoELM:
    """The initial model of a run (a pure function of the config and seed)."""
    torch.manual_seed(seed)
    model = MoELM(model_cfg)
    if model_cfg.router == "hash":  # the balanced table needs the training data's token frequencies
        model.set_token_counts(train_split.token_counts())
    return model


def checkpoint_extra(data: PackedDataset) -> dict:
    """What a checkpoint says of its data, so that capture can check a dataset's tokenizer."""
    return {"data": {"fingerprint": data.fingerprint, "vocab_size": data.vocab_size,
                     "tokenizer_sha256": data.meta.get("tokenizer_sha256"), "seq_len": data.seq_len}}


@dataclass
class RunTotals:
    """Per-run running totals a checkpoint keeps: expert loads per layer and every step's grad norm."""

    loads: np.ndarray
    grad_norms: list[float]

    @classmethod
    def restore(cls, state: dict | None, model_cfg: MoEConfig) -> "RunTotals":
        if state is None:
            return cls(np.zeros((model_cfg.n_layers, model_cfg.n_experts), dtype=np.int64), [])
        return cls(np.asarray(state["run_loads"], dtype=np.int64), list(state["grad_norms"]))

    def add(self, record: dict) -> None:
        self.loads += np.asarray(record["expert_load"], dtype=np.int64)
        self.grad_norms.append(record["grad_norm"])

    def state(self) -> dict:
        return {"run_loads": self.loads.tolist(), "grad_norms": self.grad_norms}


def summarize(metrics_path: Path, run_loads: np.ndarray, grad_norms: list[float]) -> dict:
    """Headline figures of a run: final losses, MaxVioGlobal, mean per-batch MaxVio, grad-norm CV."""
    records = read_metrics(metrics_path)
    train_recs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    per_layer = max_vio(run_loads)
    cv = grad_norm_cv(grad_norms, min(50, len(grad_norms)))
    return {
        "final_train_loss": float(np.mean([r["loss"] for r in train_recs[-10:]])) if train_recs else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "val_loss_by_domain": evals[-1]["val_loss_by_domain"] if evals else {},
        "max_vio_global": float(per_layer.mean()),
        "max_vio_global_per_layer": per_layer.tolist(),
        "max_vio_batch_mean": float(np.mean([r["max_vio"] for r in train_recs])) if train_recs else None,
        "grad_norm_cv50_mean": float(cv.mean()) if len(cv) else None,
    }


train = Stage("train", run, Inputs, Options, writes="run")
source_train = Stage("source train", run, SourceInputs, SourceOptions, writes="run")
