"""Pre-dispatch: run a frozen Grouter once over the packed data and store its routing (SPEC §1.6).

The store holds, for every *input* token of every packed sequence that training reads (both
splits, the dataset's order and boundaries), k expert ids and k gate weights. Position ``t`` of
sequence ``i`` of a split is the routing of ``split.batch([i])["input_ids"][0, t]``. Layout of a
routing store directory:

- ``manifest.json``: format and version, the dataset and Grouter fingerprints (and paths), k, E,
  seq_len, the dtypes, whether the Grouter is causal, and per split the number of sequences and
  the SHA-256 of both files;
- ``{split}.ids``: raw ``[n_sequences, seq_len, k]`` expert ids, ``uint8`` when E <= 256 else
  ``uint16``;
- ``{split}.weights``: raw ``[n_sequences, seq_len, k]`` 16-bit gate weights: the bit pattern of
  bfloat16 (default) or float16.

So a token costs ``3k`` bytes when E <= 256 (``4k`` otherwise). :class:`RoutingStore` reads it
back memory-mapped and refuses a store that is truncated, tampered with, or bound to another
dataset or Grouter.

Writing is resumable and atomic: the work happens in ``.OUT.partial`` beside ``OUT`` with a
``progress.json``; rerun the same command after a kill and it continues at the last recorded
batch, and the result is byte-identical to an uninterrupted run, because batches always start at
multiples of ``batch_size`` from the start of a split (batch composition can change floating
point results on some backends) and the Grouter runs in eval mode in float32.

Sharding over processes: launch with torchrun, e.g. ::

    torchrun --nproc_per_node 4 -m grouter.cli dispatch --grouter G --data D --out R

(or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; an already
initialised ``torch.distributed`` process group is used as it is). Rank ``r`` routes a contiguous,
``batch_size``-aligned range of the sequences of each split, so every batch is the one a single
process would run and the store is byte-identical to a single-process one. Rank 0 preallocates
the files in the shared work directory; every rank writes straight into its own slice of them
(merging copies no token data); progress is recorded per rank (``{split}/rank{r}``) at batch
steps common to all ranks, so a sharded run resumes too (with the same number of processes).
After a final barrier rank 0 checksums the files, writes the manifest and renames the directory
into place. All ranks must see the same file system. On CUDA each rank uses ``cuda:LOCAL_RANK``
and NCCL; on CPU, gloo.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import ResumableDir, read_json, read_manifest, sha256_file, write_json
from .data import SPLITS, PackedDataset
from .errors import GrouterError
from .routers import Routing

ROUTING_FORMAT, ROUTING_VERSION = "grouter-routing", 1
WEIGHTS_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Flush the files and record progress every this many batches (per rank, at common steps).
CHECKPOINT_EVERY = 64


def ids_dtype_for(n_experts: int) -> np.dtype:
    """uint8 expert ids when E <= 256, else uint16."""
    if n_experts <= 256:
        return np.dtype(np.uint8)
    if n_experts <= 65536:
        return np.dtype(np.uint16)
    raise GrouterError(f"{n_experts} experts do not fit a uint16 expert id; use at most 65536 experts")


def bytes_per_token(k: int, n_experts: int) -> int:
    """Storage per token: k ids plus k 16-bit weights."""
    return k * (ids_dtype_for(n_experts).itemsize + 2)


def _batch_ranges(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Sequence range [lo, hi) of each rank: contiguous runs of whole batches of the split."""
    n_batches = math.ceil(n / batch_size)
    return [(min(r * n_batches // world * batch_size, n), min((r + 1) * n_batches // world * batch_size, n))
            for r in range(world)]


class _Dist:
    """The process group this dispatch runs in (a single process is world 1, rank 0)."""

    def __init__(self, device_name: str):
        import torch.distributed as dist

        self.dist = dist
        self.created = False
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if dist.is_available() and not dist.is_initialized() and env_world > 1:
            from .train import resolve_device

            cuda = resolve_device(device_name).type == "cuda"
            if cuda and torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            try:
                dist.init_process_group("nccl" if cuda else "gloo")
            except (ValueError, RuntimeError) as e:
                raise GrouterError(f"WORLD_SIZE={env_world} asks for a sharded dispatch but torch.distributed could not "
                                   f"start ({str(e).splitlines()[0] if str(e) else type(e).__name__}); launch it with "
                                   "torchrun, or unset WORLD_SIZE") from None
            self.created = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank))) if self.active else 0

    def barrier(self) -> None:
        if self.active and self.world > 1:
            self.dist.barrier()

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


def _device_for(device: str, dist: _Dist) -> torch.device:
    from .train import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GrouterError("CUDA was asked for but is not available; pass --device cpu")
        if dist.world > 1:
            dev = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    return dev


def _open_slice(path: Path, dtype: np.dtype, lo: int, hi: int, row: tuple[int, int]) -> np.memmap | None:
    """Read-write map of sequences [lo, hi) of a preallocated [n, *row] file (None if empty)."""
    if hi <= lo:
        return None
    per_seq = row[0] * row[1] * dtype.itemsize
    return np.memmap(path, dtype=dtype, mode="r+", offset=lo * per_seq, shape=(hi - lo, *row))


def _preallocate(path: Path, size: int) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)


@torch.inference_mode()
def dispatch(grouter: str | Path, data: PackedDataset, out: str | Path, k: int | None = None,
             batch_size: int = 16, device: str = "auto", weights_dtype: str = "bfloat16",
             overwrite: bool = False, progress: bool = True) -> dict:
    """Write the routing store ``out`` for both splits of ``data``; resumable, atomic, shardable.

    Returns ``{"routing", "k", "n_experts", "tokens", "bytes_per_token", "seconds",
    "tokens_per_second", "resumed", "world_size"}`` (tokens: all tokens in the store;
    bytes_per_token: ids + weights, manifest excluded; the rate counts the tokens routed by this
    invocation over all ranks, divided by its wall time including loading and checksumming).
    """
    from .network import LEAK_WARNING, Grouter

    t0 = time.perf_counter()
    out = Path(out)
    if weights_dtype not in WEIGHTS_DTYPES:
        raise GrouterError(f"unknown weights dtype {weights_dtype!r}; use bfloat16 or float16")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise GrouterError(f"batch size must be a positive integer, got {batch_size!r}")
    if out.exists() and not overwrite:
        raise GrouterError(f"{out} already exists; choose another --out, or pass --overwrite")
    model = Grouter.from_pretrained(grouter)
    fingerprint = model.fingerprint()  # of the weights as saved, before any dtype or device move
    cfg = model.cfg
    E = cfg.n_experts
    k = cfg.top_k if k is None else int(k)
    if not 1 <= k <= E:
        raise GrouterError(f"k = {k} is not possible with the Grouter's {E} experts; use 1 <= --k <= {E}")
    ids_dtype = ids_dtype_for(E)
    model.check_data(data)
    L = data.seq_len
    if L > cfg.max_seq_len:
        raise GrouterError(f"the dataset's sequences ({L} tokens) are longer than the Grouter's max_seq_len "
                           f"({cfg.max_seq_len}); pack the data with --seq-len {cfg.max_seq_len} or less")
    if not cfg.causal:
        warnings.warn(LEAK_WARNING, stacklevel=3)  # past the inference_mode wrapper to the caller

    dist = _Dist(device)
    try:
        dev = _device_for(device, dist)
        model = model.float().to(dev).eval()
        identity = {"format": ROUTING_FORMAT, "version": ROUTING_VERSION, "dataset": data.fingerprint,
                    "grouter": fingerprint, "k": k, "weights_dtype": weights_dtype, "batch_size": batch_size,
                    "world_size": dist.world, "device_type": dev.type}
        job = None
        work = out.parent / f".{out.name}.partial"
        sizes = {name: len(data.split(name)) for name in SPLITS}
        if dist.rank == 0:
            job = ResumableDir(out, identity, overwrite=overwrite)
            if job.resumed:
                print(f"resuming dispatch in {job.work}", file=sys.stderr)
            for name in SPLITS:  # the full-size files every rank writes into
                files = {job.work / f"{name}.ids": sizes[name] * L * k * ids_dtype.itemsize,
                         job.work / f"{name}.weights": sizes[name] * L * k * 2}
                if any(not f.is_file() or f.stat().st_size != size for f, size in files.items()):
                    for r in range(dist.world):  # progress without its data is no progress
                        if job.done(f"{name}/rank{r}"):
                            job.set_done(f"{name}/rank{r}", 0)
                for f, size in files.items():
                    _preallocate(f, size)
        dist.barrier()
        if job is not None:
            done = {f"{name}/rank{r}": job.done(f"{name}/rank{r}") for name in SPLITS for r in range(dist.world)}
        else:
            done = read_json(work / "progress.json", "dispatch progress").get("done", {})
        resumed = any(int(v) for v in done.values())

        routed = 0
        for name in SPLITS:
            split, n = data.split(name), sizes[name]
            ranges = _batch_ranges(n, batch_size, dist.world)
            steps = max(math.ceil((hi - lo) / batch_size) for lo, hi in ranges)
            # All ranks record progress at the same steps, so they agree on where to resume.
            start = max(math.ceil(int(done.get(f"{name}/rank{r}", 0)) / batch_size) for r in range(dist.world))
            lo, hi = ranges[dist.rank]
            ids_mm = _open_slice(work / f"{name}.ids", ids_dtype, lo, hi, (L, k))
            w_mm = _open_slice(work / f"{name}.weights", np.dtype(np.uint16), lo, hi, (L, k))
            bar = tqdm(total=hi - lo, initial=min(start * batch_size, hi - lo), desc=f"dispatch {name}",
                       unit="seq", disable=not progress or dist.rank != 0, mininterval=2)
            for step in range(start, steps):
                a = lo + step * batch_size
                if a < hi:
                    b = min(a + batch_size, hi)
                    input_ids = split.batch(np.arange(a, b))["input_ids"].to(dev)
                    logits = model(input_ids)
                    if not torch.isfinite(logits).all():
                        raise GrouterError(f"the Grouter produced non-finite logits for {name} sequences {a}..{b - 1}; "
                                           "are its weights corrupt?")
                    r = model.route_logits(logits, k)
                    ids_mm[a - lo:b - lo] = r.ids.to(torch.int32).cpu().numpy().astype(ids_dtype)
                    w_mm[a - lo:b - lo] = (r.weights.to(WEIGHTS_DTYPES[weights_dtype]).view(torch.int16)
                                           .cpu().numpy().view(np.uint16))
                    routed += (b - a) * L
                    bar.update(b - a)
                if (step + 1) % CHECKPOINT_EVERY == 0 or step == steps - 1:
                    for mm in (ids_mm, w_mm):
                        if mm is not None:
                            mm.flush()
                    dist.barrier()  # every rank's data up to this step is on disk
                    if job is not None:  # any subset of these records is a safe resume point
                        for rr, (rlo, rhi) in enumerate(ranges):
                            job.set_done(f"{name}/rank{rr}", min((step + 1) * batch_size, rhi - rlo))
            bar.close()
            del ids_mm, w_mm

        if dist.active and dist.world > 1:  # the total routed by all ranks, for the rate
            on_gpu = dist.dist.get_backend() == "nccl"
            t = torch.tensor([routed], dtype=torch.int64, device=torch.device("cuda", torch.cuda.current_device())
                             if on_gpu else "cpu")
            dist.dist.all_reduce(t)
            routed = int(t.item())
        dist.barrier()
        if job is not None:
            splits = {name: {"n_sequences": sizes[name], "ids_sha256": sha256_file(work / f"{name}.ids"),
                             "weights_sha256": sha256_file(work / f"{name}.weights")} for name in SPLITS}
            manifest = {"format": ROUTING_FORMAT, "version": ROUTING_VERSION,
                        "dataset_fingerprint": data.fingerprint, "dataset_path": str(Path(data.path).resolve()),
                        "grouter_fingerprint": fingerprint, "grouter_path": str(Path(grouter).resolve()),
                        "k": k, "n_experts": E, "seq_len": L, "ids_dtype": ids_dtype.name,
                        "weights_dtype": weights_dtype, "causal": bool(cfg.causal), "splits": splits}
            write_json(work / "manifest.json", manifest)
            job.finish()
        dist.barrier()  # the store is in place before any rank returns
    finally:
        world = dist.world
        dist.close()
    seconds = time.perf_counter() - t0
    return {"routing": str(out), "k": k, "n_experts": E, "tokens": sum(sizes.values()) * L,
            "bytes_per_token": bytes_per_token(k, E), "seconds": round(seconds, 3),
            "tokens_per_second": round(routed / seconds, 1) if seconds > 0 else 0.0, "resumed": resumed,
            "world_size": world}


@dataclass
class RoutingStore:
    """A routing store opened read-only (memory-mapped) and validated against its manifest."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, data: PackedDataset | None = None, grouter_fingerprint: str | None = None,
             verify: bool = True) -> "RoutingStore":
        """Open ``path``; with ``data`` / ``grouter_fingerprint``, refuse a store made for others.

        ``verify`` also checks the files' SHA-256 against the manifest (reads them once).
        """
        path = Path(path)
        m = read_manifest(path, "manifest.json", ROUTING_FORMAT, ROUTING_VERSION, "routing store", "grouter dispatch")
        redo = f"re-create it with `grouter dispatch --out {path} --overwrite`"
        try:
            k, E, L = int(m["k"]), int(m["n_experts"]), int(m["seq_len"])
            ids_dtype = np.dtype(m["ids_dtype"])
            if ids_dtype != ids_dtype_for(E) or m["weights_dtype"] not in WEIGHTS_DTYPES:
                raise ValueError("dtypes")
            splits = {name: int(info["n_sequences"]) for name, info in m["splits"].items()}
            m["dataset_fingerprint"], m["grouter_fingerprint"]
        except (KeyError, TypeError, ValueError) as e:
            raise GrouterError(f"routing store {path} is corrupt: manifest.json lacks or mangles {e}; {redo}") from None
        if data is not None and data.fingerprint != m["dataset_fingerprint"]:
            raise GrouterError(f"routing store {path} was made for another dataset (fingerprint "
                               f"{m['dataset_fingerprint'][:12]}, this one {data.fingerprint[:12]}); "
                               "run `grouter dispatch` on this dataset")
        if grouter_fingerprint is not None and grouter_fingerprint != m["grouter_fingerprint"]:
            raise GrouterError(f"routing store {path} was made with another Grouter (fingerprint "
                               f"{m['grouter_fingerprint'][:12]}, expected {grouter_fingerprint[:12]}); "
                               "run `grouter dispatch` with this Grouter")
        for name, n in splits.items():
            for suffix, itemsize, key in (("ids", ids_dtype.itemsize, "ids_sha256"), ("weights", 2, "weights_sha256")):
                file = path / f"{name}.{suffix}"
                expected = n * L * k * itemsize
                size = file.stat().st_size if file.is_file() else None
                if size != expected:
                    raise GrouterError(f"routing store file {file} is missing or truncated ({size} bytes, expected "
                                       f"{expected}); {redo}")
                if verify and sha256_file(file) != m["splits"][name].get(key):
                    raise GrouterError(f"routing store file {file} does not match its checksum: it was modified "
                                       f"or corrupted; {redo}")
        return cls(path, m)

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def n_experts(self) -> int:
        return int(self.manifest["n_experts"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def causal(self) -> bool:
        return bool(self.manifest.get("causal", True))

    def n_sequences(self, split: str) -> int:
        return int(self._info(split)["n_sequences"])

    def _info(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise GrouterError(f"routing store {self.path} has no split {split!r}; "
                               f"it has {', '.join(self.manifest['splits'])}")
        return self.manifest["splits"][split]

    def _map(self, split: str, suffix: str, dtype: np.dtype) -> np.ndarray:
        shape = (self.n_sequences(split), self.seq_len, self.k)
        if shape[0] == 0:  # an empty file cannot be mapped
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path / f"{split}.{suffix}", dtype=dtype, mode="r", shape=shape)

    def ids(self, split: str) -> np.ndarray:
        """Expert ids ``[n_sequences, seq_len, k]`` (uint8 or uint16), memory-mapped read-only."""
        return self._map(split, "ids", np.dtype(self.manifest["ids_dtype"]))

    def raw_weights(self, split: str) -> np.ndarray:
        """Gate weights as stored: the 16-bit patterns ``[n_sequences, seq_len, k]`` (uint16)."""
        return self._map(split, "weights", np.dtype(np.uint16))

    def weights(self, split: str, idx: np.ndarray | None = None) -> torch.Tensor:
        """Gate weights as float32, of sequences ``idx`` (all when None)."""
        raw = self.raw_weights(split)
        raw = raw[np.asarray(idx, dtype=np.int64)] if idx is not None else np.asarray(raw)
        bits = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16))
        return bits.view(WEIGHTS_DTYPES[self.manifest["weights_dtype"]]).float()

    def routing(self, split: str, idx: np.ndarray) -> Routing:
        """The stored routing of sequences ``idx``: ids long ``[B, L, k]``, weights float32 ``[B, L, k]``."""
        idx = np.asarray(idx, dtype=np.int64)
        ids = torch.from_numpy(np.asarray(self.ids(split)[idx]).astype(np.int64))
        return Routing(ids, self.weights(split, idx))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={i['n_sequences']}" for s, i in self.manifest["splits"].items())
        return f"RoutingStore({str(self.path)!r}, k={self.k}, n_experts={self.n_experts}, {sizes})"
