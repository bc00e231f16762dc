"""The training-loop skeleton shared by every trainer (target and source MoEs, the Grouter, EP).

A run writes its run directory (:mod:`grouter.formats.run`: identity, metrics log, checkpoints), so
a killed run resumes exactly. Data order is a pure function of (seed, step) and the learning rate a
pure function of step, so "N steps, stop, resume, N steps" gives bit-identical parameters to
"2N steps" (tested). :func:`fit` is the loop itself: learning rate, zero-grad, backward, clip, step,
log, evaluate, checkpoint, stop. What differs between trainers (the loss, the records, what else a
checkpoint keeps) comes in as callbacks.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from .errors import GrouterError
from .formats.run import Run
from .options import COUNT, FRACTION, LEARNING_RATE, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Range, check, option


@dataclass
class TrainConfig:
    """A training run's schedule and optimiser (AdamW, linear warm-up then cosine decay)."""

    steps: int = option(200, range=POSITIVE_INT)
    batch_size: int = option(16, "sequences per step", range=POSITIVE_INT, memory=True)
    lr: float = option(3e-3, "peak learning rate", range=LEARNING_RATE)
    min_lr_ratio: float = option(0.1, "the cosine decays to this fraction of --lr", range=FRACTION)
    warmup_steps: int = option(20, range=COUNT)
    weight_decay: float = option(0.1, "AdamW's, on matrices", range=NON_NEGATIVE)
    beta1: float = option(0.9, range=Range(float, 0, False, 1))
    beta2: float = option(0.95, range=Range(float, 0, False, 1))
    grad_clip: float = option(1.0, "global gradient-norm clip", range=POSITIVE)
    eval_every: int = option(50, "steps between validations", range=POSITIVE_INT)
    eval_sequences: int = option(64, "validation sequences per domain (a fixed subset)", range=POSITIVE_INT)
    checkpoint_every: int = option(50, range=POSITIVE_INT)
    seed: int = option(0, "initialisation and data order", range=SEED)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", how=True)

    def validate(self) -> "TrainConfig":
        return check(self)


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


@dataclass
class Hooks:
    """What a trainer adds to the loop. ``forward(batch)`` computes the loss; ``evaluate(step)`` gives
    the ``eval`` record; ``state()`` what the checkpoint keeps besides the step; ``after_step(record)``
    runs after the optimizer step (non-gradient updates, running totals); ``clip()`` (default: the
    model's global norm) returns the grad norm before clipping; ``extra``: what a checkpoint says of
    its data; ``checkpoints=False`` keeps none (a sharded model cannot be saved by one rank)."""

    forward: Callable[[Any], Step]
    evaluate: Callable[[int], dict] | None = None
    state: Callable[[], dict] = dict
    after_step: Callable[[dict], None] | None = None
    clip: Callable[[], float] | None = None
    extra: dict = field(default_factory=dict)
    checkpoints: bool = True


def fit(run: Run | None, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, start: int,
        batches: Iterable[tuple[int, Any]], hooks: Hooks, desc: str = "train", progress: bool = True,
        stop_after: int | None = None) -> bool:
    """Run steps ``start .. cfg.steps - 1`` of ``(step, batch)`` from ``batches``; True when finished.

    ``run`` None: nothing is written (non-zero ranks). ``stop_after``: leave after that step (after
    checkpointing), as an interruption would.
    """
    clip = hooks.clip or (lambda: clip_all(model, cfg.grad_clip))
    save = None
    if run is not None and hooks.checkpoints:
        save = lambda done: run.save_checkpoint(model, opt, {"step": done, **hooks.state()}, hooks.extra)  # noqa: E731
    bar = tqdm(batches, initial=start, total=cfg.steps, desc=desc, disable=not progress, mininterval=2, unit="step")
    for step, batch in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        out = hooks.forward(batch)
        if not (math.isfinite(out.record["loss"]) and bool(torch.isfinite(out.loss))):
            _diverged(f"the loss became {out.record['loss']}", step, cfg)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        record = {"kind": "train", "step": step + 1, **out.record, "lr": lr, "grad_norm": clip()}
        if not math.isfinite(record["grad_norm"]):
            _diverged(f"the gradient norm became {record['grad_norm']}", step, cfg)
        opt.step()
        if hooks.after_step is not None:
            hooks.after_step(record)
        _log_and_save(run, cfg, record, hooks.evaluate, save)
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
    raise GrouterError(f"{what} at step {step}; {kept}: lower --lr and rerun with --overwrite (the run starts "
                       "over) or with another --out")


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
