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
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(scratch, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(scratch, out)


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
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_safetensors(path: str | Path, what: str) -> dict[str, "torch.Tensor"]:
    """Load a safetensors file, turning a missing, truncated or corrupt file into a GrouterError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise GrouterError(f"{what} not found: {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GrouterError(f"{what} in {path} is corrupt or truncated ({str(e).splitlines()[0]}); re-create it") from None
