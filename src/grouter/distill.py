"""Distillation: train a Grouter to reproduce a source router's logits from token ids alone.

Loss ``KL(softmax(teacher / T) || softmax(student / T)) * T^2`` averaged over tokens, with
**T = 1 by default**: the student must learn the teacher's magnitudes, not only its ranking
(the authors' code used T = 2). Teacher logits come from a targets directory written by
``grouter capture``; the teacher never re-runs. Runs resume like training runs.

With ``--document-start`` the Grouter reads each document from its start (docs/method.md#document-starts):
it learns with the context it is served with on a routing stream. The teacher's logits are those captured,
from the source's packed context.

Targets of several source layers give a Grouter with one head per layer (``head_layers``): the
loss is the KL of every head against its layer's teacher, averaged over heads (every head sees the
same tokens), and the evaluation reports each head and their mean. With ``head_groups`` G, one
head serves each of G groups of adjacent layers: the loss is every captured layer's KL against its
group's head, averaged over layers (G = 1: one shared head for all; docs/method.md#head-groups).
Compact targets (``grouter capture --top-m``) train on the KL over the kept experts and one bucket
of the rest (:func:`grouter.losses.kept_kl_loss`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .chunking import batches_of
from .device import resolve_device
from .errors import GrouterError
from .formats.grouter import Architecture, GrouterConfig
from .formats.run import read_metrics
from .formats.targets import Targets, Teacher, check_temperature
from .loop import Hooks, Step, TrainConfig, build_optimizer, fit
from .metrics import topk_recall, topk_set_agreement
from .network import LEAK_WARNING, Grouter
from .options import POSITIVE, POSITIVE_INT, option, path_input
from .routers import Heads, even_groups
from .runner import Output, Stage


def distill_schedule() -> TrainConfig:
    """The trainer's optimiser and schedule with distillation's defaults."""
    return TrainConfig(steps=600, lr=2e-3, warmup_steps=30, weight_decay=0.01, eval_every=100, eval_sequences=128,
                       checkpoint_every=100)


@dataclass
class Inputs:
    targets: Path = path_input("captured router scores (grouter capture)")


@dataclass
class Options:
    architecture: Architecture = field(default_factory=Architecture)
    schedule: TrainConfig = field(default_factory=distill_schedule)
    temperature: float = option(1.0, "KL temperature (default 1: no temperature)", range=POSITIVE)
    head_groups: int | None = option(None, "targets of several layers: one head per group of adjacent layers, "
                                     "groups as equal as can be (1: one shared head; default: a head per layer)",
                                     range=POSITIVE_INT)
    document_start: bool = option(False, "route each document from its start: attention and positions restart "
                                  "after the data's end-of-document token, as a routing stream of Megatron data "
                                  "(dispatch --megatron-data) routes it")
    stop_after: int | None = option(None, "leave after this step, as an interruption would", range=POSITIVE_INT,
                                    cli=False, how=True)


METRICS = ("kl", "topk_recall", "topk_set_match")


def _layer_metrics(teacher: Teacher, student: torch.Tensor, of_layer: tuple[int, ...], k: int) -> np.ndarray:
    """``[H, 3]``: KL, top-k recall and top-k set match of each captured layer against its head's
    logits (``student`` ``[B, L, heads, E]``)."""
    out = np.empty((len(of_layer), len(METRICS)))
    for i, h in enumerate(of_layer):
        t, s = teacher if len(of_layer) == 1 else teacher.layer(i), student[..., h, :]
        t_ids, s_ids = t.topk(k), s.topk(k, -1).indices
        out[i] = t.kl(s).item(), topk_recall(t_ids, s_ids), topk_set_agreement(t_ids, s_ids)
    return out


def layer_logits(grouter: Grouter, input_ids: torch.Tensor, of_layer: tuple[int, ...]) -> torch.Tensor:
    """The logits each captured layer is distilled against: its head's, ``[B, L, E]`` for one
    captured layer, else ``[B, L, layers, E]``."""
    logits = grouter.head_logits(input_ids)[..., list(of_layer), :]
    return logits.squeeze(-2) if len(of_layer) == 1 else logits


@torch.no_grad()
def evaluate_distill(grouter: Grouter, targets: Targets, split: str, n_sequences: int, batch_size: int,
                     device: torch.device) -> dict:
    """KL, top-k recall and exact top-k set match against the teacher on a fixed subset: their mean
    over captured layers, and with several layers each layer's (``kl_per_head``, ...: per captured
    layer, each against its head)."""
    was_training = grouter.training
    grouter.eval()
    data, k, of_layer = targets.data.split(split), targets.top_k, head_of_layer(grouter, targets)
    n = min(n_sequences, len(data))
    sums, tokens = 0.0, 0
    for idx in batches_of(n, batch_size):
        teacher = targets.teacher(split, idx).to(device)
        student = grouter.head_logits(data.batch(idx)["input_ids"].to(device))
        count = student.shape[0] * student.shape[1]
        sums = sums + _layer_metrics(teacher, student, of_layer, k) * count
        tokens += count
    grouter.train(was_training)
    per_head = sums / tokens
    result = dict(zip(METRICS, per_head.mean(0).tolist()))
    if len(per_head) > 1:
        result.update({f"{m}_per_head": per_head[:, i].tolist() for i, m in enumerate(METRICS)})
    return result


def head_of_layer(grouter: Grouter, targets: Targets) -> tuple[int, ...]:
    """The Grouter's head each captured layer of ``targets`` is distilled against."""
    heads = grouter.cfg.heads
    return heads.of_layer if heads is not None else (0,) * len(targets.layers)


def _heads(targets: Targets, groups: int | None) -> dict:
    """The GrouterConfig fields of the heads: a head per captured layer, per group of them, or none."""
    heads = targets.heads
    if groups is None or heads is None:
        if groups not in (None, 1):
            raise GrouterError(f"--head-groups {groups} needs targets of several layers; these hold one "
                               "(capture with --layers)")
        return {"head_layers": list(heads.layers) if heads else [], "source_layers": heads.source_layers if heads else 0}
    of_layer = even_groups(len(heads.layers), groups)
    if groups == 1:
        return {"head_layers": [], "source_layers": 0}
    return {"head_layers": list(heads.layers), "source_layers": heads.source_layers,
            "head_groups": list(Heads(heads.layers, heads.source_layers, of_layer).groups)}


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    """Train (or resume) a Grouter in ``out``; returns a summary with the held-out quality."""
    cfg = o.schedule
    targets = Targets.open(inputs.targets)
    check_temperature(targets.top_m, o.temperature)
    data = targets.data
    train_split = data.split("train")
    if cfg.batch_size > len(train_split):
        raise GrouterError(f"batch size {cfg.batch_size} exceeds the {len(train_split)} training sequences")
    if o.document_start and not data.documents_end_with_eos:
        raise GrouterError(f"--document-start needs documents that end with the end-of-document token, but those of "
                           f"{data.path} do not (Megatron data made without --append-eod); remake the prefixes with "
                           "preprocess_data.py --append-eod and `grouter data megatron` them again")
    gcfg = GrouterConfig(vocab_size=data.vocab_size, n_experts=targets.n_experts, top_k=targets.top_k,
                         max_seq_len=max(data.seq_len, 4096), seed=cfg.seed, **asdict(o.architecture),
                         **_heads(targets, o.head_groups),
                         document_eos=data.eos_id if o.document_start else None,
                         provenance={"source": targets.manifest["source"], "distilled_on": data.fingerprint,
                                     "distilled_seq_len": data.seq_len,
                                     "tokenizer_sha256": data.meta.get("tokenizer_sha256"),
                                     "temperature": o.temperature,
                                     **({"top_m": targets.top_m} if targets.top_m else {})}).validate()
    train_files = targets.manifest["splits"]["train"]
    identity = {"grouter": gcfg.to_dict(), "distill": {**asdict(cfg), "temperature": o.temperature, "device": None},
                "targets": train_files["logits" if "logits" in train_files else "topm"]["sha256"]}
    run = out.run(identity)
    resume_state = run.start()

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    grouter = Grouter(gcfg).to(device).train()
    opt = build_optimizer(grouter, cfg)
    start = run.resume(grouter, opt, resume_state)

    of_layer = head_of_layer(grouter, targets)

    def forward(idx: np.ndarray) -> Step:
        teacher = targets.teacher("train", idx).to(device)
        loss = teacher.kl(layer_logits(grouter, train_split.batch(idx)["input_ids"].to(device), of_layer),
                          o.temperature)
        return Step(loss, {"loss": loss.item()})

    def evaluate(step: int) -> dict:
        return evaluate_distill(grouter, targets, "val", cfg.eval_sequences, cfg.batch_size, device)

    batches = ((step, train_split.batch_indices(step, cfg.batch_size, cfg.seed)) for step in range(start, cfg.steps))
    hooks = Hooks(forward, evaluate=evaluate, extra={"leaks_future": not gcfg.causal})
    if not fit(run, grouter, opt, cfg, start, batches, hooks, "distill", out.progress, o.stop_after):
        return {"out": str(out.path), "stopped_at": o.stop_after}

    evals = [r for r in read_metrics(run.metrics_path) if r["kind"] == "eval"]
    summary = {"grouter": str(out.path), "steps": cfg.steps, "n_experts": gcfg.n_experts, "top_k": gcfg.top_k,
               **({"head_layers": gcfg.head_layers} if gcfg.head_layers else {}),
               **({"head_groups": gcfg.head_groups} if gcfg.head_groups else {}),
               "parameters": grouter.num_parameters(), "causal": gcfg.causal, "document_start": o.document_start,
               **{f"val_{k}": v for k, v in evals[-1].items() if k not in ("kind", "step")}}
    if not gcfg.causal:
        summary["warning"] = LEAK_WARNING
    run.finish(summary)
    return summary


distill = Stage("distill", run, Inputs, Options, writes="run")
