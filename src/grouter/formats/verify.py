"""Checking every byte of an artifact against its checksums, now (``grouter verify``).

Readers verify what they read as they read it (docs/method.md#integrity); this reads everything at
once, e.g. after copying a routing store to another file system, before a long run starts. The
artifact's kind is told by its manifest.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..artifacts import read_json
from ..errors import GrouterError
from ..integrity import verify_file
from .dataset import SPLITS, PackedDataset
from .grouter import GROUTER_FORMAT, GrouterConfig, check_fingerprint, fingerprint, load_grouter
from .model import MODEL_FORMAT, load_model
from .plan import Plan
from .run import checked_files, read_run
from .store import RoutingStore
from .stream import STREAM_FILES, RoutingStream
from .targets import Targets


def _dataset(path: Path) -> tuple[int, dict]:
    data = PackedDataset.open(path)
    data.tokenizer()
    for name in SPLITS:
        split = data.split(name)  # verifies the index
        if split.checked is not None:
            split.checked.check_all()
    return sum((path / f"{s}.tokens").stat().st_size for s in SPLITS), {}


def _targets(path: Path) -> tuple[int, dict]:
    targets = Targets.open(path, verify=True)
    return sum((path / f"{split}.{kind}").stat().st_size for split in targets.manifest["splits"]
               for kind in targets.layout), {}


def _store(path: Path) -> tuple[int, dict]:
    RoutingStore.open(path).verify()
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".ids", ".weights")), {}


def _stream(path: Path) -> tuple[int, dict]:
    RoutingStream.open(path).verify()
    return sum((path / name).stat().st_size for name in STREAM_FILES), {}


def _model(path: Path) -> tuple[int, dict]:
    fmt = read_json(path / "config.json", "model config").get("format")
    if fmt == GROUTER_FORMAT:
        meta, state = load_grouter(path)
        check_fingerprint(path, meta, fingerprint(GrouterConfig.from_dict(meta["config"]), state))
    elif fmt == MODEL_FORMAT:
        load_model(path)
    else:
        raise GrouterError(f"{path} holds no grouter model (config.json format {fmt!r})")
    return (path / "model.safetensors").stat().st_size, {}


def _run(path: Path) -> tuple[int, dict]:
    """A run: its checkpoint (or an EP run's gathered model), and a finished run's log and probes."""
    run = read_run(path)
    size = sum(_model(path / name)[0] for name in ("model",) if (path / name / "config.json").is_file())
    ckpt = path / "checkpoint"
    if ckpt.is_dir():
        size += _model(ckpt)[0]
        trainer = read_json(ckpt / "trainer_state.json", "trainer state", checked=True)
        verify_file(ckpt / "optimizer.safetensors", trainer.get("optimizer_sha256"), "optimizer state",
                    f"the checkpoint in {ckpt} is damaged: resume from an earlier copy, or --overwrite the run")
        read_json(ckpt / "optimizer.json", "optimizer state", checked=True)
        size += (ckpt / "optimizer.safetensors").stat().st_size
    if run.get("status") == "complete":
        return size + checked_files(path, run), {"status": "complete"}
    command = f"grouter {run.get('command', 'train')}"
    return size, {"status": "unfinished", "note": f"a `{command}` run that did not finish: what it wrote is intact; "
                                                  "rerun the same command to resume it"}


def _plan(path: Path) -> tuple[int, dict]:
    Plan.load(path)
    return (path / "plan.json").stat().st_size, {}


def _report(path: Path) -> tuple[int, dict]:
    read_json(path / "report.json", "report", checked=True)
    return (path / "report.json").stat().st_size, {}


# By the manifest a directory holds: its kind, and the check (which returns the bytes it read and what
# else to report).
KINDS = {"meta.json": ("dataset", _dataset), "targets.json": ("targets", _targets),
         "manifest.json": ("routing store", _store), "stream.json": ("routing stream", _stream),
         "run.json": ("training run", _run),
         "plan.json": ("placement plan", _plan), "config.json": ("model", _model),
         "report.json": ("report", _report)}


def verify_artifact(path: str | Path) -> dict:
    """Verify the artifact in ``path``; returns its kind, the bytes checked and the time it took (and for
    a run, whether it finished)."""
    path = Path(path)
    if not path.is_dir():
        raise GrouterError(f"{path} is not a directory; pass a grouter artifact directory")
    t0 = time.perf_counter()
    for manifest, (kind, check) in KINDS.items():
        if (path / manifest).is_file():
            checked, more = check(path)
            seconds = time.perf_counter() - t0
            return {"path": str(path), "kind": kind, "ok": True, **more, "bytes_checked": checked,
                    "seconds": round(seconds, 3)}
    raise GrouterError(f"{path} is not a grouter artifact (none of {', '.join(KINDS)} in it)")
