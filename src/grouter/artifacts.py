"""Writing and reading on-disk artifacts safely.

Every command's output directory is built in a hidden sibling and renamed into place only when
complete, so a killed command never leaves a half-written artifact that a later command would
accept. JSON metadata is read through one function that turns a missing or corrupt file into a
clear :class:`GrouterError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import GrouterError


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``out`` when the block finishes without error.

    On error the scratch directory is removed and ``out`` is left as it was. An existing ``out``
    is refused unless ``overwrite`` is set, in which case it is replaced only after the new one
    is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise GrouterError(f"{out} already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the artifact should read like any directory
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    move_into_place(scratch, out)


def move_into_place(src: Path, out: Path) -> None:
    """Rename a finished directory to ``out``, replacing an older ``out`` only at the last moment."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(src, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, out)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so readers see either the old content or the new, never a torn write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path, what: str) -> dict:
    """Read a JSON object; ``what`` names the artifact in the error (e.g. "dataset metadata")."""
    path = Path(path)
    if not path.is_file():
        raise GrouterError(f"{what} not found: {path} is missing")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GrouterError(f"{what} is corrupt: {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise GrouterError(f"{what} is corrupt: {path} does not hold a JSON object")
    return obj


def header(fmt: str, version: int) -> dict:
    """The two fields every grouter artifact's JSON starts with; :func:`read_manifest` checks them."""
    return {"format": fmt, "version": version}


def _named(what: str) -> str:
    return what if what.lower().startswith("grouter") else f"grouter {what}"


def read_manifest(path: Path, file: str, fmt: str, version: int, what: str, create: str,
                  accept_file: bool = False) -> dict:
    """The manifest of an artifact directory, after checking that the directory exists and holds
    this format at this version. ``what`` names the artifact ("routing store"); ``create`` is the
    command that makes one, quoted in every message. ``accept_file``: ``path`` may also be the
    manifest file itself (any name), for artifacts that are a single file."""
    path = Path(path)
    if accept_file and path.is_file():
        file = path.name
        manifest = read_json(path, f"{what} manifest")
    else:
        if not path.is_dir():
            raise GrouterError(f"{what} {path} not found; create it with `{create}`")
        if not (path / file).is_file():
            raise GrouterError(f"{path} is not a {_named(what)} (no {file}); create it with `{create}`")
        manifest = read_json(path / file, f"{what} manifest")
    if manifest.get("format") != fmt:
        raise GrouterError(f"{path} is not a {_named(what)} ({file} format is {manifest.get('format')!r})")
    if manifest.get("version") != version:
        raise GrouterError(f"{what} {path} has format version {manifest.get('version')!r} but this grouter reads "
                           f"version {version}; re-create it with `{create}`")
    return manifest


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Content hash of a file, streamed so large token files never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def save_safetensors(path: str | Path, tensors: dict[str, "torch.Tensor"]) -> None:
    """Save tensors atomically (tmp file + rename); shared storage is copied, as safetensors requires."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_safetensors(path: str | Path, what: str) -> dict[str, "torch.Tensor"]:
    """Load a safetensors file, turning a missing, truncated or corrupt file into a GrouterError."""
    path = Path(path)
    if not path.is_file():
        raise GrouterError(f"{what} not found: {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GrouterError(f"{what} in {path} is corrupt or truncated ({str(e).splitlines()[0]}); re-create it") from None


class ResumableDir:
    """Scratch space for a long job that survives a kill and is renamed into place when done.

    Work happens in ``.<name>.partial`` beside ``out`` with a ``progress.json`` recording the
    job's identity (its inputs and options) and how far it got. Rerunning the same job resumes;
    a different job finding a stale partial directory starts it over. ``finish()`` makes ``out``
    appear atomically, complete.
    """

    def __init__(self, out: str | Path, identity: dict, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise GrouterError(f"{self.out} already exists; choose another --out, or pass --overwrite")
        self.identity = identity
        self.work = self.out.parent / f".{self.out.name}.partial"
        state = None
        if (self.work / "progress.json").exists():
            try:
                state = read_json(self.work / "progress.json", "job progress")
            except GrouterError:
                state = None
        if state is None or state.get("identity") != identity:
            shutil.rmtree(self.work, ignore_errors=True)
            state = {"identity": identity, "done": {}}
        self.resumed = bool(state["done"])
        self.work.mkdir(parents=True, exist_ok=True)
        self._state = state
        write_json(self.work / "progress.json", state)

    def done(self, key: str) -> int:
        return int(self._state["done"].get(key, 0))

    def progress(self) -> dict[str, int]:
        """Every recorded key and how far it got."""
        return {key: int(v) for key, v in self._state["done"].items()}

    def set_done(self, key: str, value: int) -> None:
        """Record progress; call only after the data it covers is flushed to disk."""
        self._state["done"][key] = value
        write_json(self.work / "progress.json", self._state)

    def finish(self) -> Path:
        (self.work / "progress.json").unlink()
        move_into_place(self.work, self.out)
        return self.out
