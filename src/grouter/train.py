"""Training loop for the built-in MoE LM (source models, baselines, Grouter-routed targets).

A run directory holds everything needed to resume exactly:
- ``run.json``: the model/train config and the dataset it trains on, plus status and summary;
- ``metrics.jsonl``: one ``train`` record per step, one ``eval`` record per validation;
- ``checkpoint/``: model weights + optimizer state (safetensors) and trainer state (JSON),
  replaced atomically, so a killed run resumes from the last complete checkpoint.

Data order is a pure function of (seed, step) and the learning rate a pure function of step, so
"N steps, stop, resume, N steps" gives bit-identical parameters to "2N steps" (tested).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .artifacts import atomic_dir, load_safetensors, read_json, save_safetensors, write_json
from .data import DataSplit, PackedDataset
from .errors import GrouterError
from .metrics import grad_norm_cv, max_vio
from .model import MoEConfig, MoELM
from .routers import Routing

# Routing supplied with the batch for ``router="external"``: (split name, sequence indices) ->
# Routing with ids/weights [B, L, k] aligned with the batch's input tokens.
RoutingSource = Callable[[str, np.ndarray], Routing]


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_sequences: int = 64  # validation sequences per domain (a fixed subset)
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_sequences"):
            if getattr(self, name) < 1:
                raise GrouterError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise GrouterError(f"--lr must be positive, got {self.lr}")
        return self


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise GrouterError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms) do not. Frozen tensors are buffers, not params."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors = {f"{idx}.{name}": t for idx, st in sd["state"].items() for name, t in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
        for chunk in np.array_split(idx, math.ceil(len(idx) / cfg.batch_size)):
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


class Run:
    """A run directory: config identity, metrics log, checkpoints (any model with save_pretrained)."""

    def __init__(self, out: Path, identity: dict, overwrite: bool = False):
        self.out, self.identity = Path(out), identity
        self.metrics_path = self.out / "metrics.jsonl"
        self.checkpoint_dir = self.out / "checkpoint"
        if overwrite and self.out.exists():
            with atomic_dir(self.out, overwrite=True):
                pass  # replaces out with an empty directory, atomically

    def completed_summary(self) -> dict | None:
        """The summary of this very run if it already finished (rerunning it is a no-op)."""
        run_json = self.out / "run.json"
        if not run_json.exists():
            return None
        existing = read_json(run_json, "run record")
        if existing.get("identity") == self.identity and existing.get("status") == "complete":
            return existing["summary"]
        return None

    def start(self) -> dict | None:
        """Create the run, or check that an existing one is this run. Returns its trainer state
        when resuming (None for a fresh start)."""
        run_json = self.out / "run.json"
        if run_json.exists():
            existing = read_json(run_json, "run record")
            if existing.get("identity") != self.identity:
                raise GrouterError(f"{self.out} holds a run with another configuration or dataset; "
                                   "use another --out, or --overwrite to start over")
            if (self.checkpoint_dir / "trainer_state.json").exists():
                return read_json(self.checkpoint_dir / "trainer_state.json", "trainer state")
            return None
        if self.out.exists() and any(self.out.iterdir()):
            raise GrouterError(f"{self.out} exists and is not a grouter run; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(run_json, {"identity": self.identity, "status": "running"})
        return None

    def trim_metrics(self, step: int) -> None:
        """Drop log records past the checkpoint we resume from, so the log matches an uninterrupted run."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(self, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, extra: dict) -> None:
        with atomic_dir(self.checkpoint_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp, extra=extra)
            tensors, meta = optimizer_tensors(opt)
            save_safetensors(tmp / "optimizer.safetensors", tensors)
            write_json(tmp / "optimizer.json", meta)
            write_json(tmp / "trainer_state.json", state)

    def load_checkpoint(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        state = load_safetensors(self.checkpoint_dir / "model.safetensors", "checkpoint weights")
        try:
            model.load_state_dict(state)
            load_optimizer(opt, load_safetensors(self.checkpoint_dir / "optimizer.safetensors", "optimizer state"),
                           read_json(self.checkpoint_dir / "optimizer.json", "optimizer state"))
        except (RuntimeError, KeyError, ValueError) as e:
            raise GrouterError(f"checkpoint in {self.checkpoint_dir} does not match this run ({str(e).splitlines()[0]}); "
                               "it is corrupt: remove it, or use --overwrite to start over") from None

    def finish(self, summary: dict) -> None:
        write_json(self.out / "run.json", {"identity": self.identity, "status": "complete", "summary": summary})


def external_routing(data: PackedDataset, routing_dir: str | Path | None = None, grouter_dir: str | Path | None = None,
                     device: str = "auto") -> tuple[RoutingSource, dict, int, int]:
    """Routing for ``router="external"``: a routing store (read, no router compute) or a Grouter
    run online each step. Returns (source, identity, n_experts, k)."""
    if routing_dir is not None:
        from .dispatch import RoutingStore

        store = RoutingStore.open(routing_dir, data=data)
        m = store.manifest
        identity = {"kind": "store", "grouter_fingerprint": m["grouter_fingerprint"], "k": store.k,
                    "weights_dtype": m["weights_dtype"], "causal": m["causal"]}
        return store.routing, identity, store.n_experts, store.k
    from .network import Grouter

    dev = resolve_device(device)
    grouter = Grouter.from_pretrained(grouter_dir).to(dev)
    grouter.check_data(data)

    def online(split: str, idx: np.ndarray) -> Routing:
        return grouter.route(data.split(split).batch(idx)["input_ids"].to(dev))

    identity = {"kind": "online", "grouter_fingerprint": grouter.fingerprint(), "k": grouter.cfg.top_k,
                "causal": grouter.cfg.causal}
    return online, identity, grouter.cfg.n_experts, grouter.cfg.top_k


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead of the consumer."""
    done = object()
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work():
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:  # surfaced in the consumer, where it can be reported
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def check_vocab(model_cfg: MoEConfig, data: PackedDataset) -> None:
    if model_cfg.vocab_size != data.vocab_size:
        raise GrouterError(f"the model's vocabulary ({model_cfg.vocab_size}) differs from the dataset's "
                           f"({data.vocab_size}): the data was tokenized with another tokenizer; "
                           "re-tokenize it with the model's tokenizer")


def train(data: PackedDataset, out: str | Path, model_cfg: MoEConfig, cfg: TrainConfig,
          routing_source: RoutingSource | None = None, routing_identity: dict | None = None,
          overwrite: bool = False, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) a run in ``out``; returns its summary.

    ``routing_identity`` names where external routing comes from (store or Grouter fingerprint),
    so a run is never resumed with other routing. ``stop_after`` ends the process early at that
    step (after checkpointing), which is how the resume test simulates an interruption.
    """
    out = Path(out)
    cfg.validate()
    model_cfg.validate()
    check_vocab(model_cfg, data)
    if model_cfg.max_seq_len < data.seq_len:
        raise GrouterError(f"model max_seq_len {model_cfg.max_seq_len} is shorter than the data's seq_len {data.seq_len}")
    if (model_cfg.router == "external") != (routing_source is not None):
        raise GrouterError("external routing needs a routing source (--routing), and only it does")
    train_split, val_split = data.split("train"), data.split("val")
    if cfg.batch_size > len(train_split):
        raise GrouterError(f"batch size {cfg.batch_size} exceeds the {len(train_split)} training sequences")

    identity = {"model": asdict(model_cfg), "train": asdict(cfg), "data_fingerprint": data.fingerprint,
                "routing": routing_identity}
    identity["train"].pop("device")  # where it runs is not what it is
    run = Run(out, identity, overwrite)
    if (done := run.completed_summary()) is not None:
        return done
    resume_state = run.start()

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = MoELM(model_cfg)
    if model_cfg.router == "hash":
        model.set_token_counts(train_split.token_counts())
    model.to(device).train()
    opt = build_optimizer(model, cfg)
    n_layers, n_experts = model_cfg.n_layers, model_cfg.n_experts
    run_loads = np.zeros((n_layers, n_experts), dtype=np.int64)
    start_step, grad_norms = 0, []
    if resume_state is not None:
        run.load_checkpoint(model, opt)
        start_step = resume_state["step"]
        run_loads = np.asarray(resume_state["run_loads"], dtype=np.int64)
        grad_norms = list(resume_state["grad_norms"])
    run.trim_metrics(start_step)
    extra = {"data": {"fingerprint": data.fingerprint, "vocab_size": data.vocab_size,
                      "tokenizer_sha256": data.meta.get("tokenizer_sha256"), "seq_len": data.seq_len}}

    def checkpoint(step: int) -> None:
        state = {"step": step, "run_loads": run_loads.tolist(), "grad_norms": grad_norms}
        run.save_checkpoint(model, opt, state, extra)

    def batches():
        """Everything a step needs that does not depend on the model: gathered in the background."""
        for step in range(start_step, cfg.steps):
            idx = train_split.batch_indices(step, cfg.batch_size, cfg.seed)
            routing = routing_source("train", idx) if routing_source else None
            if routing is not None and routing.order is None:
                routing = routing.grouped(n_experts)  # once per batch, not once per layer
            yield step, train_split.batch(idx), routing

    tokens_per_step = cfg.batch_size * data.seq_len
    t0, timed_tokens = time.perf_counter(), 0
    last_train_loss = math.nan
    bar = tqdm(prefetch(batches()), initial=start_step, total=cfg.steps, desc=f"train {out.name}",
               disable=not progress, mininterval=2, unit="step")
    for step, batch, routing in bar:
        routing = routing.to(device) if routing is not None else None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        out_ = model(batch["input_ids"].to(device), labels=batch["labels"].to(device), routing=routing)
        if not torch.isfinite(out_.loss):
            checkpoint(step)
            raise GrouterError(f"loss became {out_.loss.item()} at step {step}; lower --lr "
                               f"(last good checkpoint kept in {run.checkpoint_dir})")
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        model.after_optimizer_step()

        loads = out_.expert_counts.cpu().numpy()
        run_loads += loads
        grad_norms.append(grad_norm)
        last_train_loss = out_.lm_loss.item()
        timed_tokens += tokens_per_step
        done = step + 1
        run.log({"kind": "train", "step": done, "tokens": done * tokens_per_step, "loss": last_train_loss,
                 "aux_loss": out_.aux_loss.item(), "lr": lr_at(step, cfg), "grad_norm": grad_norm,
                 "max_vio": float(max_vio(loads).mean()), "expert_load": loads.tolist()})
        bar.set_postfix(loss=f"{last_train_loss:.3f}", refresh=False)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            run.log({"kind": "eval", "step": done, "tokens": done * tokens_per_step,
                     **evaluate(model, val_split, cfg, device, routing_source)})
            save_routing_probe(model, val_split, device, routing_source, out / "probes" / f"step_{done:08d}.npy")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint(done)
        if stop_after is not None and done >= stop_after:
            bar.close()
            return {"out": str(out), "stopped_at": done}
    bar.close()

    elapsed = time.perf_counter() - t0
    summary = summarize(run.metrics_path, run_loads, grad_norms)
    summary.update({"out": str(out), "steps": cfg.steps, "tokens": cfg.steps * tokens_per_step,
                    "tokens_per_second": timed_tokens / elapsed if timed_tokens else None,
                    "parameters": model.num_parameters(), "active_parameters": model.num_parameters(active_only=True)})
    run.finish(summary)
    return summary


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise GrouterError(f"metrics log {path} is missing; is this a grouter run directory?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


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
