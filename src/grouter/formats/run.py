"""The run directory: what a training run (source, target, Grouter distillation, EP) leaves on disk.

- ``run.json``: the run's identity (configs and inputs), its status and, when complete, its summary;
- ``metrics.jsonl``: one ``train`` record per step, one ``eval`` record per validation;
- ``checkpoint/``: model weights and optimizer state (safetensors) and trainer state (JSON),
  replaced atomically, so a killed run resumes from the last complete checkpoint;
- ``probes/``: routing probes of target runs (``step_N.npy``), for the consistency metric.

A finished run's ``run.json`` records the SHA-256 of ``metrics.jsonl`` and of every probe
(``files``), which its readers verify (:func:`checked_files`): a changed digit in a loss is found
like a changed byte in a weights file. It also names the command that made the run, so that advice
about an unfinished run names the command that resumes it. A log whose last line was torn by a kill
(no newline) reads without that line, and resuming rewrites it.

:class:`Run` writes one, :func:`read_run`, :func:`read_metrics` and :func:`finished_checkpoint`
read it. The training loop that fills it is :mod:`grouter.loop`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import (atomic_dir, atomic_write_bytes, header, load_safetensors, read_json, read_manifest,
                         save_safetensors, write_json)
from ..errors import GrouterError
from ..integrity import file_sha256, verify_file

RUN_FORMAT, RUN_VERSION = "grouter-run", 1


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
    """The records of a metrics log; a last line torn by a kill (no newline at the end) is left out."""
    path = Path(path)
    if not path.is_file():
        raise GrouterError(f"metrics log {path} is missing; is this a grouter run directory?")
    lines = path.read_text().split("\n")[:-1]  # after the last newline: nothing, or a line torn by a kill
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise GrouterError(f"metrics log {path} is corrupt at line {number} (not a JSON record); re-create the "
                               "run with --overwrite, or resume it from its last checkpoint") from None
    return records


def checked_files(run_dir: Path, run: dict) -> int:
    """Verify a finished run's log and probes against the checksums its run.json records; the bytes read."""
    redo = f"the run in {run_dir} was changed after it finished; re-create it with --overwrite"
    checked = 0
    for name, sha in run.get("files", {}).items():
        verify_file(run_dir / name, sha, "run file", redo)
        checked += (run_dir / name).stat().st_size
    return checked


def run_files(run_dir: Path) -> dict[str, str]:
    """``files`` of a finished run.json: the log and the probes, by SHA-256."""
    names = ["metrics.jsonl"] + [f"probes/{p.name}" for p in sorted((run_dir / "probes").glob("*.npy"))]
    return {name: file_sha256(run_dir / name) for name in names if (run_dir / name).is_file()}


def read_run(path: str | Path) -> dict:
    """The ``run.json`` of a run directory (identity, status, summary), header checked."""
    return read_manifest(Path(path), "run.json", RUN_FORMAT, RUN_VERSION, "training run", "grouter train")


def finished_checkpoint(path: Path, command: str) -> Path:
    """The model directory to load for ``path``: ``path`` itself, or, for a run directory, its final
    checkpoint, which only a finished run has. An unfinished run is refused (saying how to resume it,
    with the command its run.json names, else ``command``, or to pass ``RUN/checkpoint`` to use its
    last checkpoint on purpose)."""
    if (path / "config.json").exists() or not (path / "run.json").exists():
        return path
    run = read_run(path)
    if run.get("status") != "complete":
        state = path / "checkpoint" / "trainer_state.json"
        step = read_json(state, "trainer state").get("step") if state.exists() else 0
        raise GrouterError(f"{path} is a run that did not finish (checkpoint at step {step}); rerun the same "
                           f"`grouter {run.get('command', command.removeprefix('grouter '))}` command to resume it, "
                           f"or pass {path / 'checkpoint'} to use that checkpoint on purpose")
    return path / "checkpoint"


class Run:
    """A run directory: identity, metrics log, checkpoints (any model with ``save_pretrained``)."""

    def __init__(self, out: Path, identity: dict, overwrite: bool = False, command: str = "train"):
        self.out, self.identity, self.command = Path(out), identity, command
        self.metrics_path = self.out / "metrics.jsonl"
        self.checkpoint_dir = self.out / "checkpoint"
        if overwrite and self.out.exists():
            with atomic_dir(self.out, overwrite=True):
                pass  # replaces out with an empty directory, atomically

    def _record(self) -> dict | None:
        return read_run(self.out) if (self.out / "run.json").exists() else None

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
        return {**header(RUN_FORMAT, RUN_VERSION), "command": self.command, "identity": self.identity, "status": status,
                **more}

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
        keep = [r for r in read_metrics(self.metrics_path) if r["step"] <= step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep).encode())

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
        write_json(self.out / "run.json", self._header("complete", summary=summary, files=run_files(self.out)))
