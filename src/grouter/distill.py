"""Distillation: train a Grouter to reproduce a source router's logits from token ids alone.

Loss ``KL(softmax(teacher / T) || softmax(student / T)) * T^2`` averaged over tokens, with
**T = 1 by default**: the student must learn the teacher's magnitudes, not only its ranking
(the authors' code used T = 2). Teacher logits come from a targets directory written by
``grouter capture``; the teacher never re-runs. Runs resume like training runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .capture import Targets
from .errors import GrouterError
from .metrics import topk_recall, topk_set_agreement
from .network import LEAK_WARNING, Grouter, GrouterConfig
from .train import Run, TrainConfig, build_optimizer, lr_at, read_metrics, resolve_device


@dataclass
class DistillConfig(TrainConfig):
    """The trainer's optimiser and schedule with distillation's defaults, plus the KL temperature."""

    steps: int = 600
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    eval_every: int = 100
    eval_sequences: int = 128
    checkpoint_every: int = 100
    temperature: float = 1.0

    def validate(self) -> "DistillConfig":
        if self.temperature <= 0:
            raise GrouterError(f"--temperature must be positive, got {self.temperature}")
        super().validate()
        return self


def kl_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/T) || softmax(student/T)), times T^2."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def evaluate_distill(grouter: Grouter, targets: Targets, split: str, n_sequences: int, batch_size: int,
                     device: torch.device) -> dict:
    """KL, top-k recall and exact top-k set match against the teacher on a fixed subset."""
    was_training = grouter.training
    grouter.eval()
    data, k = targets.data.split(split), targets.top_k
    n = min(n_sequences, len(data))
    kl_sum, recall_sum, match_sum, tokens = 0.0, 0.0, 0.0, 0
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        teacher = targets.logits(split, idx).to(device)
        student = grouter(data.batch(idx)["input_ids"].to(device))
        count = teacher.shape[0] * teacher.shape[1]
        t_ids, s_ids = teacher.topk(k, -1).indices, student.topk(k, -1).indices
        kl_sum += kl_loss(teacher, student).item() * count
        recall_sum += topk_recall(t_ids, s_ids) * count
        match_sum += topk_set_agreement(t_ids, s_ids) * count
        tokens += count
    grouter.train(was_training)
    return {"kl": kl_sum / tokens, "topk_recall": recall_sum / tokens, "topk_set_match": match_sum / tokens}


def distill(targets: Targets, out: str | Path, gcfg: GrouterConfig, cfg: DistillConfig, overwrite: bool = False,
            stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) a Grouter in ``out``; returns a summary with the held-out quality."""
    cfg.validate()
    data = targets.data
    if gcfg.n_experts != targets.n_experts:
        raise GrouterError(f"Grouter has {gcfg.n_experts} experts but the targets have {targets.n_experts}")
    if gcfg.vocab_size != data.vocab_size:
        raise GrouterError(f"Grouter vocabulary {gcfg.vocab_size} differs from the dataset's {data.vocab_size}")
    train_split = data.split("train")
    if cfg.batch_size > len(train_split):
        raise GrouterError(f"batch size {cfg.batch_size} exceeds the {len(train_split)} training sequences")
    gcfg.provenance = {**gcfg.provenance, "source": targets.manifest["source"],
                       "distilled_on": data.fingerprint, "tokenizer_sha256": data.meta.get("tokenizer_sha256"),
                       "temperature": cfg.temperature}
    gcfg.validate()
    identity = {"grouter": asdict(gcfg), "distill": {**asdict(cfg), "device": None},
                "targets": targets.manifest["splits"]["train"]["sha256"]}
    run = Run(Path(out), identity, overwrite)
    if (done := run.completed_summary()) is not None:
        return done
    resume_state = run.start()

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    grouter = Grouter(gcfg).to(device).train()
    opt = build_optimizer(grouter, cfg)
    start = 0
    if resume_state is not None:
        run.load_checkpoint(grouter, opt)
        start = resume_state["step"]
    run.trim_metrics(start)
    extra = {"leaks_future": not gcfg.causal}

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill", unit="step",
               disable=not progress, mininterval=2)
    for step in bar:
        idx = train_split.batch_indices(step, cfg.batch_size, cfg.seed)
        teacher = targets.logits("train", idx).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = kl_loss(teacher, grouter(train_split.batch(idx)["input_ids"].to(device)), cfg.temperature)
        if not torch.isfinite(loss):
            raise GrouterError(f"distillation loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(grouter.parameters(), cfg.grad_clip).item()
        opt.step()
        done = step + 1
        run.log({"kind": "train", "step": done, "kl": loss.item(), "lr": lr_at(step, cfg), "grad_norm": grad_norm})
        bar.set_postfix(kl=f"{loss.item():.3f}", refresh=False)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            run.log({"kind": "eval", "step": done,
                     **evaluate_distill(grouter, targets, "val", cfg.eval_sequences, cfg.batch_size, device)})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            run.save_checkpoint(grouter, opt, {"step": done}, extra)
        if stop_after is not None and done >= stop_after:
            return {"out": str(out), "stopped_at": done}
    bar.close()

    evals = [r for r in read_metrics(run.metrics_path) if r["kind"] == "eval"]
    summary = {"grouter": str(out), "steps": cfg.steps, "n_experts": gcfg.n_experts, "top_k": gcfg.top_k,
               "parameters": grouter.num_parameters(), "causal": gcfg.causal,
               **{f"val_{k}": v for k, v in evals[-1].items() if k not in ("kind", "step")}}
    if not gcfg.causal:
        summary["warning"] = LEAK_WARNING
    run.finish(summary)
    return summary
