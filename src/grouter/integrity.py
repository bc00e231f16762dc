"""Checksums that every artifact carries and every reader verifies before it uses the bytes.

Three kinds, by size and access pattern:

- **JSON manifests** carry a ``json_sha256`` of their own content (written by
  :func:`grouter.artifacts.write_json`, checked by :func:`grouter.artifacts.read_json`), so a
  changed digit in a manifest is found like a changed byte in a weights file.
- **Small files** (weights, optimizer state, tokenizers, sequence indexes) are listed in their
  artifact's manifest by SHA-256 and hashed whole when they are loaded (:func:`verify_file`).
- **Large memory-mapped files** (token streams, captured scores, routing stores: up to hundreds of
  GB) are recorded per chunk of :data:`CHUNK_BYTES` (:func:`file_checksum`). A
  :class:`CheckedFile` verifies each chunk the first time any of its bytes is read, so a reader
  pays for what it reads, once, and a training run that reads 1 % of a store hashes 1 % of it.
  ``grouter verify DIR`` checks everything at once.

Chunk digests are CRC-32: the threat is corruption (a flipped bit, a torn or truncated write), not
an adversary, and CRC-32 hashes at memory speed where SHA-256 would double the cost of reading a
store (docs/RESULTS.md#integrity-checks has both measured). Whole files and manifests use SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import threading
import zlib
from pathlib import Path

import numpy as np

from .errors import GrouterError

CHUNK_BYTES = 1 << 22  # 4 MiB
CHUNK_ALGORITHM = "crc32"


def _digest(block) -> str:
    return f"{zlib.crc32(block):08x}"


def fingerprint_of(obj) -> str:
    """SHA-256 of a JSON-able object (canonical form): the identity of an artifact's content."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """SHA-256 of a whole file, streamed so large files never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def file_checksum(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Per-chunk digests of a file in one streaming pass, and ``sha256``: a digest of them all
    (the file's identity, as a fingerprint)."""
    chunks = []
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            chunks.append(_digest(block))
    return {"algorithm": CHUNK_ALGORITHM, "bytes": Path(path).stat().st_size, "chunk_bytes": chunk_bytes,
            "chunks": chunks, "sha256": hashlib.sha256("".join(chunks).encode()).hexdigest()}


def verify_file(path: str | Path, sha256: str | None, what: str, fix: str) -> None:
    """Refuse a small file whose SHA-256 is not the recorded one."""
    path = Path(path)
    if not sha256:
        raise GrouterError(f"{what} {path} has no recorded checksum; {fix}")
    if not path.is_file():
        raise GrouterError(f"{what} {path} is missing; {fix}")
    if file_sha256(path) != sha256:
        raise GrouterError(f"{what} {path} does not match its checksum: it was modified or corrupted; {fix}")


class CheckedFile:
    """A large file whose chunks are verified against ``checksum`` the first time they are read.

    ``check(lo, hi)`` before reading bytes ``[lo, hi)``; ``check_rows`` for many fixed-size rows at
    once (vectorised: only unverified chunks are hashed, each once). Thread-safe: a data loader's
    background thread may check while the main thread trains.
    """

    def __init__(self, path: str | Path, checksum: dict, what: str, fix: str):
        self.path, self.what, self.fix = Path(path), what, fix
        try:
            self.size, self.chunk = int(checksum["bytes"]), int(checksum["chunk_bytes"])
            self.digests = list(checksum["chunks"])
        except (KeyError, TypeError, ValueError):
            raise GrouterError(f"{what} {self.path} has no valid recorded checksum; {fix}") from None
        if checksum.get("algorithm") != CHUNK_ALGORITHM:
            raise GrouterError(f"{what} {self.path} was checksummed with {checksum.get('algorithm')!r}, this grouter "
                               f"checks {CHUNK_ALGORITHM}; {fix}")
        actual = self.path.stat().st_size if self.path.is_file() else None
        if actual != self.size or len(self.digests) != -(-self.size // self.chunk):
            raise GrouterError(f"{what} {self.path} is missing or truncated ({actual} bytes, expected {self.size}); "
                               f"{fix}")
        self._ok = np.zeros(len(self.digests), dtype=bool)
        self._lock = threading.Lock()

    def check(self, lo: int, hi: int) -> None:
        if hi > lo:
            self._verify(np.arange(lo // self.chunk, (hi - 1) // self.chunk + 1))

    def check_rows(self, starts: np.ndarray, row_bytes) -> None:
        """Rows of ``row_bytes`` bytes (one size, or one per row) starting at byte offsets ``starts``."""
        starts = np.asarray(starts, dtype=np.int64)
        row_bytes = np.broadcast_to(np.asarray(row_bytes, dtype=np.int64), starts.shape)
        starts, row_bytes = starts[row_bytes > 0], row_bytes[row_bytes > 0]
        if starts.size == 0:
            return
        first, last = starts // self.chunk, (starts + row_bytes - 1) // self.chunk
        spans = last - first + 1
        chunks = np.repeat(first, spans) + (np.arange(spans.sum()) - np.repeat(np.cumsum(spans) - spans, spans))
        self._verify(np.unique(chunks))

    def check_all(self) -> None:
        self._verify(np.arange(len(self.digests)))

    @property
    def verified_fraction(self) -> float:
        return float(self._ok.mean()) if len(self._ok) else 1.0

    def _verify(self, chunks: np.ndarray) -> None:
        todo = chunks[~self._ok[chunks]]
        if not todo.size:
            return
        with self._lock:
            data = np.memmap(self.path, dtype=np.uint8, mode="r")  # hashed in place: the page cache, no copy
            for i in todo.tolist():
                lo = i * self.chunk
                if not self._ok[i] and _digest(data[lo:lo + self.chunk]) != self.digests[i]:
                    raise GrouterError(f"{self.what} {self.path} is corrupt: bytes {lo}..{min(lo + self.chunk, self.size) - 1} "
                                       f"do not match their checksum; {self.fix}")
                self._ok[i] = True
