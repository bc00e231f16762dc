"""Writing and reading on-disk artifacts safely.

Every command's output directory is built in a hidden sibling and renamed into place only when
complete, so a killed command never leaves a half-written artifact that a later command would
accept. JSON metadata is written with a checksum of its own content and read through one
function that turns a missing, corrupt or altered file into a clear :class:`GrouterError`; every
artifact's JSON starts with the same header (format, version), checked by :func:`read_manifest`.
An output directory is locked while a command writes it (:func:`output_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import GrouterError
from .integrity import file_sha256, verify_file


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """Every command checks its --out first, before any slow work: an existing one is kept unless
    ``overwrite`` (then replaced only once the new one is complete)."""
    out = Path(out)
    if out.exists() and not overwrite:
        kind = "a directory" if out.is_dir() else "a file"
        raise GrouterError(f"{out} already exists ({kind}); choose another --out, or pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``out`` when the block finishes without error.

    On error the scratch directory is removed and ``out`` is left as it was. An existing ``out``
    is refused unless ``overwrite`` is set, in which case it is replaced only after the new one
    is complete.
    """
    out = Path(out)
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the artifact should read like any directory
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    move_into_place(scratch, out)


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` while a command writes it; a second writer is refused with
    the first one's process id and command. The lock (``fcntl.flock`` on ``.OUT.lock`` beside
    ``out``) dies with its process, so a killed command never leaves ``out`` locked, and the lock file
    is removed when the lock is released (a killed command's is reused and removed by the next)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    with _locked_file(path) as f:
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} (`{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))}`)")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still locked: a process that opened it now finds it gone and retries


@contextlib.contextmanager
def _locked_file(path: Path):
    """``path`` opened and flock'ed; retried when the file was removed (by its last holder) between
    opening and locking, so that two processes never hold locks on two files of the same name."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            out = path.parent / path.name[1:].removesuffix(".lock")
            raise GrouterError(f"{out} is being written by {holder}; wait for it to finish, or choose another "
                               "--out") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    with f:
        yield f


def move_into_place(src: Path, out: Path) -> None:
    """Rename a finished directory to ``out``, replacing an older ``out`` only at the last moment."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(src, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, out)


def is_disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "no space left on device" in str(e).lower()


def disk_full(path: Path, needed: int | None = None) -> GrouterError:
    """The one line a full disk gets: the file, and the bytes it needs."""
    size = f" needs {needed:,} bytes" if needed else " needs more space"
    return GrouterError(f"no space left on the device of {path}: writing it{size}; free space, or choose an --out on "
                        "another disk")


def reserve(f, size: int, path: Path) -> None:
    """Give the open file ``f`` its ``size`` bytes now, so that a full disk is this error, not a SIGBUS
    when a memory map later writes into pages the file system cannot back."""
    if not size:
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: truncate as before
            f.truncate(size)
        elif is_disk_full(e):
            raise disk_full(path, size) from None
        else:
            raise


def append_array(f, array, path: Path) -> None:
    """``array.tofile(f)``; a full disk (which numpy reports as a short write) is :func:`disk_full`."""
    try:
        array.tofile(f)
    except OSError as e:
        if is_disk_full(e) or shutil.disk_usage(path.parent).free < array.nbytes:
            raise disk_full(path, array.nbytes) from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so readers see either the old content or the new, never a torn write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_full(path, len(data)) if is_disk_full(e) else e from None
    os.replace(tmp, path)


JSON_CHECKSUM = "json_sha256"


def _content_sha256(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != JSON_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode_json(obj: dict, compact: bool = False) -> bytes:
    """``obj`` as JSON with the checksum of its content (``json_sha256``), which :func:`read_json` checks."""
    obj = {**obj, JSON_CHECKSUM: _content_sha256(obj)}
    if compact:
        return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: str | Path, obj: dict) -> None:
    atomic_write_bytes(path, encode_json(obj))


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise GrouterError(f"{what} not found: {path} is missing")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GrouterError(f"{what} is corrupt: {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise GrouterError(f"{what} is corrupt: {path} does not hold a JSON object")
    return obj


def _checked(obj: dict, path: Path, what: str, required: bool) -> dict:
    """``obj`` without its checksum, after verifying it (``required``: it must have one)."""
    if JSON_CHECKSUM not in obj and not required:
        return obj
    if obj.get(JSON_CHECKSUM) != _content_sha256(obj):
        state = "does not match its checksum" if JSON_CHECKSUM in obj else "has no checksum"
        raise GrouterError(f"{what} is corrupt: {path} {state} (it was modified or damaged); re-create it with the "
                           "command that wrote it")
    return {k: v for k, v in obj.items() if k != JSON_CHECKSUM}


def read_json(path: str | Path, what: str, checked: bool = False) -> dict:
    """Read a JSON object; ``what`` names the artifact in the error (e.g. "dataset metadata").
    Its content checksum is verified when it has one; ``checked``: it must have one (every JSON
    grouter writes does)."""
    path = Path(path)
    return _checked(_load_json(path, what), path, what, checked)


def header(fmt: str, version: int) -> dict:
    """The two fields every grouter artifact's JSON starts with; :func:`read_manifest` checks them."""
    return {"format": fmt, "version": version}


def _named(what: str) -> str:
    return what if what.lower().startswith("grouter") else f"grouter {what}"


def read_manifest(path: Path, file: str, fmt: str, version: int | tuple[int, ...], what: str, create: str,
                  accept_file: bool = False) -> dict:
    """The manifest of an artifact directory, after checking that the directory exists and holds
    this format at this version (or one of these versions). ``what`` names the artifact ("routing
    store"); ``create`` is the command that makes one, quoted in every message. ``accept_file``:
    ``path`` may also be the manifest file itself (any name), for artifacts that are a single file."""
    path = Path(path)
    if accept_file and path.is_file():
        file, source = path.name, path
    else:
        if not path.is_dir():
            raise GrouterError(f"{what} {path} not found; create it with `{create}`")
        if not (path / file).is_file():
            raise GrouterError(f"{path} is not a {_named(what)} (no {file}); create it with `{create}`")
        source = path / file
    manifest = _load_json(source, f"{what} manifest")
    if manifest.get("format") != fmt:
        raise GrouterError(f"{path} is not a {_named(what)} ({file} format is {manifest.get('format')!r})")
    versions = version if isinstance(version, tuple) else (version,)
    if manifest.get("version") not in versions:
        raise GrouterError(f"{what} {path} has format version {manifest.get('version')!r} but this grouter reads "
                           f"version {' or '.join(map(str, versions))}; re-create it with `{create}`")
    return _checked(manifest, source, f"{what} manifest", required=True)


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors atomically (tmp file + rename); shared storage is copied, as safetensors requires."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    except (SafetensorError, OSError) as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, sum(t.nbytes for t in tensors.values())) from None
        raise
    os.replace(tmp, path)


def load_safetensors(path: str | Path, what: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file: a missing, truncated, altered (``sha256`` given: the recorded
    checksum) or non-finite one is a GrouterError, never weights to train on."""
    path = Path(path)
    if not path.is_file():
        raise GrouterError(f"{what} not found: {path} is missing")
    if sha256 is not None:
        verify_file(path, sha256, what, "re-create it")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GrouterError(f"{what} in {path} is corrupt or truncated ({str(e).splitlines()[0]}); re-create it") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise GrouterError(f"{what} in {path} holds NaN or inf in {name!r}: it is corrupt or comes from a diverged "
                               "run; re-create it, or resume from an earlier checkpoint")
    return tensors


def save_weights(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """A model directory: ``model.safetensors`` and ``config.json`` (``config``, which starts with
    the artifact header, plus the weights' checksum)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / "model.safetensors", tensors)
    write_json(directory / "config.json", {**config, "weights_sha256": file_sha256(directory / "model.safetensors")})


def load_weights(directory: Path, fmt: str, version: int, what: str, create: str) -> tuple[dict, dict]:
    """``(config.json, tensors)`` of a model directory written by :func:`save_weights`, verified."""
    meta = read_manifest(directory, "config.json", fmt, version, what, create)
    return meta, load_safetensors(directory / "model.safetensors", f"{what} weights", meta.get("weights_sha256", ""))


class ResumableDir:
    """Scratch space for a long job that survives a kill and is renamed into place when done.

    Work happens in ``.<name>.partial`` beside ``out`` with a ``progress.json`` recording the
    job's identity (its inputs and options) and how far it got. Rerunning the same job resumes;
    a different job finding a stale partial directory starts it over. ``finish()`` makes ``out``
    appear atomically, complete.
    """

    def __init__(self, out: str | Path, identity: dict, overwrite: bool = False):
        self.out = Path(out)
        refuse_existing(self.out, overwrite)
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
