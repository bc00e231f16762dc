"""The training-loop skeleton shared by every trainer (target and source MoEs, the Grouter, EP).

A run directory holds everything needed to resume exactly:
- ``run.json``: the run's identity (configs and inputs), its status and, when complete, its summary;
- ``metrics.jsonl``: one ``train`` record per step, one ``eval`` record per validation;
- ``checkpoint/``: model weights and optimizer state (safetensors) and trainer state (JSON),
  replaced atomically, so a killed run resumes from the last complete checkpoint.

Data order is a pure function of (seed, step) and the learning rate a pure function of step, so
"N steps, stop, resume, N steps" gives bit-identical parameters to "2N steps" (tested).
:func:`fit` is the loop itself: learning rate, zero-grad, backward, clip, step, log, evaluate,
checkpoint, stop. What differs between trainers (the loss, the records, what else a checkpoint
keeps) comes in as callbacks.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from .artifacts import atomic_dir, header, load_safetensors, read_json, read_manifest, save_safetensors, write_json
from .errors import GrouterError
from .integrity import file_sha256

RUN_FORMAT, RUN_VERSION = "grouter-run", 1


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
        for name in ("lr", "grad_clip", "min_lr_ratio", "weight_decay", "beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 or (value == 0 and name in ("min_lr_ratio", "weight_decay")))):
                raise GrouterError(f"--{name.replace('_', '-')} must be a finite positive number, got {value}")
        if self.warmup_steps < 0:
            raise GrouterError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        return self


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
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


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise GrouterError(f"metrics log {path} is missing; is this a grouter run directory?")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def read_run(path: str | Path) -> dict:
    """The ``run.json`` of a run directory (identity, status, summary), header checked."""
    return read_manifest(Path(path), "run.json", RUN_FORMAT, RUN_VERSION, "training run", "grouter train")


def finished_checkpoint(path: Path, command: str) -> Path:
    """The model directory to load for ``path``: ``path`` itself, or, for a run directory, its final
    checkpoint, which only a finished run has. An unfinished run is refused (saying how to resume it,
    or to pass ``RUN/checkpoint`` to use its last checkpoint on purpose)."""
    if (path / "config.json").exists() or not (path / "run.json").exists():
        return path
    run = read_run(path)
    if run.get("status") != "complete":
        state = path / "checkpoint" / "trainer_state.json"
        step = read_json(state, "trainer state").get("step") if state.exists() else 0
        raise GrouterError(f"{path} is a run that did not finish (checkpoint at step {step}); rerun the same "
                           f"`{command}` command to resume it, or pass {path / 'checkpoint'} to use that "
                           "checkpoint on purpose")
    return path / "checkpoint"


class Run:
    """A run directory: identity, metrics log, checkpoints (any model with ``save_pretrained``)."""

    def __init__(self, out: Path, identity: dict, overwrite: bool = False):
        self.out, self.identity = Path(out), identity
        self.metrics_path = self.out / "metrics.jsonl"
        self.checkpoint_dir = self.out / "checkpoint"
        if overwrite and self.out.exists():
            with atomic_dir(self.out, overwrite=True):
                pass  # replaces out with an empty directory, atomically

    def _record(self) -> dict | None:
        return read_run(self.out) if (self.out / "run.json").exists() else None

    def completed_summary(self) -> dict | None:
        """The summary of this very run if it already finished (rerunning it is a no-op)."""
        existing = self._record()
        if existing and existing.get("identity") == self.identity and existing.get("status") == "complete":
            return existing["summary"]
        return None

    def start(self) -> dict | None:
        """Create the run, or check that an existing one is this run. Returns its trainer state
        when resuming (None for a fresh start)."""
        existing = self._record()
        if existing is not None:
            if existing.get("identity") != self.identity:
                raise GrouterError(f"{self.out} holds a run with another configuration or dataset; "
                                   "use another --out, or --overwrite to start over")
            if (self.checkpoint_dir / "trainer_state.json").exists():
                return read_json(self.checkpoint_dir / "trainer_state.json", "trainer state")
            return None
        if self.out.exists() and any(self.out.iterdir()):
            raise GrouterError(f"{self.out} exists and is not a grouter run; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "run.json", self._header("running"))
        return None

    def _header(self, status: str, **more) -> dict:
        return {**header(RUN_FORMAT, RUN_VERSION), "identity": self.identity, "status": status, **more}

    def resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict | None) -> int:
        """Load the checkpoint when ``state`` says we resume; drop later log records. Returns the step."""
        step = 0
        if state is not None:
            self.load_checkpoint(model, opt)
            step = int(state["step"])
        self.trim_metrics(step)
        return step

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
        """Weights (with their checksum), optimizer state and trainer state, replaced atomically."""
        with atomic_dir(self.checkpoint_dir, overwrite=True) as tmp:
            model.save_pretrained(tmp, extra=extra)
            tensors, meta = optimizer_tensors(opt)
            save_safetensors(tmp / "optimizer.safetensors", tensors)
            write_json(tmp / "optimizer.json", meta)
            write_json(tmp / "trainer_state.json", {**state, "optimizer_sha256": file_sha256(tmp / "optimizer.safetensors")})

    def load_checkpoint(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        """Load the checkpoint into ``model`` and ``opt``; every file is checked against its checksum."""
        ckpt = self.checkpoint_dir
        config = read_json(ckpt / "config.json", "checkpoint config")
        trainer = read_json(ckpt / "trainer_state.json", "trainer state")
        state = load_safetensors(ckpt / "model.safetensors", "checkpoint weights", config.get("weights_sha256", ""))
        optimizer = load_safetensors(ckpt / "optimizer.safetensors", "optimizer state", trainer.get("optimizer_sha256", ""))
        try:
            model.load_state_dict(state)
            load_optimizer(opt, optimizer, read_json(ckpt / "optimizer.json", "optimizer state"))
        except (RuntimeError, KeyError, ValueError) as e:
            raise GrouterError(f"checkpoint in {self.checkpoint_dir} does not match this run ({str(e).splitlines()[0]}); "
                               "it is corrupt: remove it, or use --overwrite to start over") from None

    def finish(self, summary: dict) -> None:
        write_json(self.out / "run.json", self._header("complete", summary=summary))


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


@dataclass
class Step:
    """What one training step's forward gives the loop: the loss to backpropagate and the
    step's log record, whose ``loss`` (a float, the same on every rank) is checked for finiteness."""

    loss: torch.Tensor
    record: dict


def clip_all(model: torch.nn.Module, max_norm: float) -> float:
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()


def fit(run: Run | None, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, start: int,
        batches: Iterable[tuple[int, Any]], forward: Callable[[Any], Step], *,
        evaluate: Callable[[int], dict] | None = None, state: Callable[[], dict] = dict,
        after_step: Callable[[dict], None] | None = None, clip: Callable[[], float] | None = None,
        extra: dict | None = None, checkpoints: bool = True, desc: str = "train", progress: bool = True,
        stop_after: int | None = None) -> bool:
    """Run steps ``start .. cfg.steps - 1`` of ``(step, batch)`` from ``batches``; True when finished.

    ``forward(batch)`` computes the loss; ``clip()`` (default: the model's global norm) returns the
    grad norm before clipping; ``after_step(record)`` runs after the optimizer step (non-gradient
    updates, running totals); ``evaluate(step)`` gives the ``eval`` record; ``state()`` what the
    checkpoint keeps besides the step; ``checkpoints=False`` keeps none (a sharded model cannot be
    saved by one rank). ``run`` None: nothing is written (non-zero ranks).
    ``stop_after``: leave after that step (after checkpointing), as an interruption would.
    """
    clip = clip or (lambda: clip_all(model, cfg.grad_clip))
    save = None
    if run is not None and checkpoints:
        save = lambda done: run.save_checkpoint(model, opt, {"step": done, **state()}, extra or {})  # noqa: E731
    bar = tqdm(batches, initial=start, total=cfg.steps, desc=desc, disable=not progress, mininterval=2, unit="step")
    for step, batch in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        out = forward(batch)
        if not (math.isfinite(out.record["loss"]) and bool(torch.isfinite(out.loss))):
            _diverged(f"the loss became {out.record['loss']}", step, cfg)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        record = {"kind": "train", "step": step + 1, **out.record, "lr": lr, "grad_norm": clip()}
        if not math.isfinite(record["grad_norm"]):
            _diverged(f"the gradient norm became {record['grad_norm']}", step, cfg)
        opt.step()
        if after_step is not None:
            after_step(record)
        _log_and_save(run, cfg, record, evaluate, save)
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        if stop_after is not None and step + 1 >= stop_after:
            bar.close()
            return step + 1 >= cfg.steps
    bar.close()
    return True


def _diverged(what: str, step: int, cfg: TrainConfig) -> None:
    """Stop before a non-finite update reaches the weights; the last checkpoint stays as it was."""
    last = step - step % cfg.checkpoint_every
    kept = f"the last good checkpoint (step {last}) is kept" if last else "no checkpoint was written yet"
    raise GrouterError(f"{what} at step {step}; {kept}: lower --lr and rerun")


def _log_and_save(run: Run | None, cfg: TrainConfig, record: dict, evaluate, save) -> None:
    done = record["step"]
    last = done == cfg.steps
    records = [record]
    if evaluate is not None and (done % cfg.eval_every == 0 or last):
        records.append({"kind": "eval", "step": done, **evaluate(done)})
    for r in records if run is not None else ():
        run.log(r)
    if save is not None and (done % cfg.checkpoint_every == 0 or last):
        save(done)
