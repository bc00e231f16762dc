"""The routing store: k expert ids and k gate weights for every input token of a packed dataset.

Position ``t`` of sequence ``i`` of a split is the routing of ``split.batch([i])["input_ids"][0, t]``
(both splits, the dataset's order and boundaries: exactly what training reads). Layout of a store
directory:

- ``manifest.json``: the artifact header (format, version), the dataset and Grouter fingerprints
  (and paths), k, E, seq_len, the dtypes, whether the Grouter is causal, and per split the number
  of sequences and the checksums of both files (per chunk: a reader verifies the chunks it reads,
  the first time it reads them);
- ``{split}.ids``: raw ``[n_sequences, seq_len, k]`` expert ids, ``uint8`` when E <= 256 else
  ``uint16``;
- ``{split}.weights``: raw ``[n_sequences, seq_len, k]`` 16-bit gate weights: the bit pattern of
  bfloat16 (default) or float16.

So a token costs ``3k`` bytes when E <= 256 (``4k`` otherwise). A Grouter with per-layer heads
stores every head: ``[n_sequences, seq_len, H, k]``, ``H·3k`` bytes per token, and the manifest
(version 3) names the heads' source layers (``head_layers``) and the source's depth
(``source_layers``); readers map a target's layers to heads by relative depth
(:class:`grouter.routers.Heads`), so one store serves targets of any depth. Head groups (fewer
heads than source layers, ``head_groups``: the head of each of ``head_layers``) are version 4. A
one-head store is written exactly as before (version 2).

:class:`StoreWriter` is the one writer (pre-dispatch, synthetic stores of tests and benchmarks);
:class:`RoutingStore` reads a store back memory-mapped and refuses one that is truncated, tampered
with, or bound to another dataset or Grouter. See docs/method.md#pre-dispatch-and-the-routing-store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_dir, read_manifest, reserve, write_json
from ..errors import GrouterError
from ..integrity import CheckedFile, file_checksum
from ..routers import Heads, Routing
from .dataset import PackedDataset

ROUTING_FORMAT = "grouter-routing"
ROUTING_VERSION = 4  # 2: per-chunk checksums; 3: per-layer heads; 4: head groups (each written only for them)
PER_LAYER_VERSION = 3
ONE_HEAD_VERSION = 2
WEIGHTS_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def ids_dtype_for(n_experts: int) -> np.dtype:
    """uint8 expert ids when E <= 256, else uint16."""
    if n_experts <= 256:
        return np.dtype(np.uint8)
    if n_experts <= 65536:
        return np.dtype(np.uint16)
    raise GrouterError(f"{n_experts} experts do not fit a uint16 expert id; use at most 65536 experts")


def bytes_per_token(k: int, n_experts: int, heads: int = 1) -> int:
    """Storage per token: k ids plus k 16-bit weights, per head."""
    return heads * k * (ids_dtype_for(n_experts).itemsize + 2)


def head_fields(heads: Heads | None) -> dict:
    """The manifest's version and per-layer head fields (none for one head: the version 2 layout)."""
    if heads is None:
        return {"version": ONE_HEAD_VERSION}
    fields = {"version": PER_LAYER_VERSION, "heads": len(heads), "head_layers": list(heads.layers),
              "source_layers": heads.source_layers}
    return {**fields, "version": ROUTING_VERSION, "head_groups": list(heads.groups)} if heads.groups else fields


def weight_bits(weights: torch.Tensor, weights_dtype: str) -> np.ndarray:
    """Gate weights as the uint16 bit patterns the store holds."""
    return weights.to(WEIGHTS_DTYPES[weights_dtype]).view(torch.int16).cpu().numpy().view(np.uint16)


def check_expert_ids(ids: torch.Tensor, n_experts: int, where: str | None = None) -> None:
    """Refuse expert ids outside ``0..n_experts-1``: routing to write (``where`` None), or read from ``where``."""
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < n_experts:
        if where is None:
            raise GrouterError(f"routing holds expert ids outside 0..{n_experts - 1}; it cannot be stored")
        raise GrouterError(f"{where} holds expert id {int(ids.max())} for {n_experts} experts (corrupt)")


def row_shape(seq_len: int, k: int, heads: Heads | None) -> tuple[int, ...]:
    """The shape of one sequence's ids or weights in a store."""
    return (seq_len, k) if heads is None else (seq_len, len(heads), k)


@dataclass
class StoreWriter:
    """Writes the files of a routing store in ``work``, in any order of splits and sequence ranges.

    :meth:`allocate` sizes a split's two files; :meth:`maps` opens a read-write window on sequences
    ``[lo, hi)`` (several processes can fill disjoint windows of the same files); :meth:`finish`
    checksums the files and writes the manifest. :func:`write_store` does all three for routing held
    in memory.
    """

    work: Path
    seq_len: int
    k: int
    n_experts: int
    weights_dtype: str = "bfloat16"
    heads: Heads | None = None  # per-layer heads: one routing per head

    def __post_init__(self):
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise GrouterError(f"unknown weights dtype {self.weights_dtype!r}; use bfloat16 or float16")
        if not 1 <= self.k <= self.n_experts:
            raise GrouterError(f"k = {self.k} is not possible with {self.n_experts} experts; use 1 <= k <= E")
        self.work = Path(self.work)
        self.ids_dtype = ids_dtype_for(self.n_experts)
        self.row_shape = row_shape(self.seq_len, self.k, self.heads)
        self.sizes: dict[str, int] = {}

    def _files(self, split: str) -> dict[Path, np.dtype]:
        return {self.work / f"{split}.ids": self.ids_dtype, self.work / f"{split}.weights": np.dtype(np.uint16)}

    def allocate(self, split: str, n_sequences: int) -> bool:
        """Size the split's files for ``n_sequences``; True when they already had that size (resume)."""
        self.sizes[split] = n_sequences
        kept = True
        for path, dtype in self._files(split).items():
            size = n_sequences * math.prod(self.row_shape) * dtype.itemsize
            kept = kept and path.is_file() and path.stat().st_size == size
            with open(path, "r+b" if path.exists() else "wb") as f:
                f.truncate(size)
                reserve(f, size, path)
        return kept

    def maps(self, split: str, lo: int, hi: int) -> tuple[np.memmap, np.memmap] | None:
        """Read-write ``(ids, weight bits)`` maps of sequences ``[lo, hi)``; None for an empty range."""
        if hi <= lo:
            return None
        row = math.prod(self.row_shape)
        return tuple(np.memmap(path, dtype=dtype, mode="r+", offset=lo * row * dtype.itemsize,
                               shape=(hi - lo, *self.row_shape)) for path, dtype in self._files(split).items())

    def put(self, maps: tuple[np.memmap, np.memmap], at: int, routing: Routing) -> None:
        """Write ``routing`` (ids and weights ``[B, seq_len, k]``, or ``[B, seq_len, H, k]`` with
        per-layer heads) at row ``at`` of the window ``maps``."""
        ids, bits = maps
        b = routing.ids.shape[0]
        if tuple(routing.ids.shape[1:]) != self.row_shape or routing.heads != self.heads:
            raise GrouterError(f"routing of shape {list(routing.ids.shape)} (heads {routing.heads}) does not fit a store "
                               f"of rows {list(self.row_shape)} (heads {self.heads})")
        check_expert_ids(routing.ids, self.n_experts)
        ids[at:at + b] = routing.ids.to(torch.int32).cpu().numpy().astype(self.ids_dtype)
        bits[at:at + b] = weight_bits(routing.weights, self.weights_dtype)

    def finish(self, data: PackedDataset | None, grouter_fingerprint: str, grouter_path: str,
               causal: bool = True) -> dict:
        """Checksum the files and write ``manifest.json``; ``data`` None marks a synthetic store."""
        splits = {name: {"n_sequences": n, "ids": file_checksum(self.work / f"{name}.ids"),
                         "weights": file_checksum(self.work / f"{name}.weights")}
                  for name, n in self.sizes.items()}
        manifest = {"format": ROUTING_FORMAT, **head_fields(self.heads),
                    "dataset_fingerprint": data.fingerprint if data is not None else "synthetic",
                    "dataset_path": str(Path(data.path).resolve()) if data is not None else "synthetic",
                    "grouter_fingerprint": grouter_fingerprint, "grouter_path": grouter_path,
                    "k": self.k, "n_experts": self.n_experts, "seq_len": self.seq_len,
                    "ids_dtype": self.ids_dtype.name, "weights_dtype": self.weights_dtype, "causal": bool(causal),
                    "splits": splits}
        write_json(self.work / "manifest.json", manifest)
        return manifest


def write_store(out: str | Path, routing: dict[str, Routing], n_experts: int, data: PackedDataset | None = None,
                grouter_fingerprint: str = "synthetic", grouter_path: str = "synthetic",
                weights_dtype: str = "bfloat16", causal: bool = True, overwrite: bool = False) -> Path:
    """Write a routing store holding ``routing[split]`` (ids and weights ``[n, seq_len, k]``, or
    ``[n, seq_len, H, k]`` with ``heads`` set), atomically."""
    first = next(iter(routing.values()))
    seq_len, k = first.ids.shape[1], first.ids.shape[-1]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = StoreWriter(tmp, seq_len, k, n_experts, weights_dtype, first.heads)
        for split, r in routing.items():
            writer.allocate(split, r.ids.shape[0])
            if (maps := writer.maps(split, 0, r.ids.shape[0])) is not None:
                writer.put(maps, 0, r)
                for m in maps:
                    m.flush()
            del maps
        writer.finish(data, grouter_fingerprint, grouter_path, causal)
    return Path(out)


class RoutingManifest:
    """What a routing store's and a routing stream's manifests both say: E, k, the ids' dtype, the heads."""

    manifest: dict

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def n_experts(self) -> int:
        return int(self.manifest["n_experts"])

    @property
    def ids_dtype(self) -> np.dtype:
        return np.dtype(self.manifest["ids_dtype"])

    def _check_dtypes(self) -> None:
        """The ids' dtype is the one E experts need and the weights' a known one (ValueError if not)."""
        m = self.manifest
        if np.dtype(m["ids_dtype"]) != ids_dtype_for(int(m["n_experts"])) or m["weights_dtype"] not in WEIGHTS_DTYPES:
            raise ValueError("dtypes")

    @property
    def heads(self) -> Heads | None:
        """Per-layer heads (None: one routing for every layer)."""
        m = self.manifest
        return Heads.of(m.get("head_layers", []), m.get("source_layers", 0), m.get("head_groups", ()))


@dataclass
class RoutingStore(RoutingManifest):
    """A routing store opened read-only (memory-mapped) and validated against its manifest."""

    path: Path
    manifest: dict
    _files: dict = field(default_factory=dict, repr=False)  # (split, "ids" | "weights") -> CheckedFile
    _verify: bool = True

    @classmethod
    def open(cls, path: str | Path, data: PackedDataset | None = None, grouter_fingerprint: str | None = None,
             verify: bool = True) -> "RoutingStore":
        """Open ``path``; with ``data`` / ``grouter_fingerprint``, refuse a store made for others.

        The files' sizes are checked at once; with ``verify`` (the default) their bytes are checked
        against the manifest's per-chunk checksums as they are read, each chunk the first time.
        """
        path = Path(path)
        m = read_manifest(path, "manifest.json", ROUTING_FORMAT, (ONE_HEAD_VERSION, PER_LAYER_VERSION, ROUTING_VERSION),
                          "routing store",
                          "grouter dispatch")
        store = cls(path, m)
        store._check_manifest()
        store._check_binding(data, grouter_fingerprint)
        store._files = {(name, kind): CheckedFile(path / f"{name}.{kind}", info.get(kind), "routing store file",
                                                 store._redo)
                        for name, info in m["splits"].items() for kind in ("ids", "weights")}
        store._verify = verify
        return store

    @property
    def _redo(self) -> str:
        return f"re-create it with `grouter dispatch --out {self.path} --overwrite`"

    def _check_manifest(self) -> None:
        m = self.manifest
        try:
            int(m["k"]), int(m["seq_len"])
            self._check_dtypes()
            for info in m["splits"].values():
                int(info["n_sequences"])
            m["dataset_fingerprint"], m["grouter_fingerprint"]
            heads = self.heads
            if m["version"] != head_fields(heads)["version"] or m.get("heads", 1) != (len(heads) if heads else 1):
                raise ValueError("heads")
        except (KeyError, TypeError, ValueError, GrouterError) as e:
            raise GrouterError(f"routing store {self.path} is corrupt: manifest.json lacks or mangles {e}; "
                               f"{self._redo}") from None

    def _check_binding(self, data: PackedDataset | None, grouter_fingerprint: str | None) -> None:
        m = self.manifest
        if data is not None and data.fingerprint != m["dataset_fingerprint"]:
            raise GrouterError(f"routing store {self.path} was made for another dataset (fingerprint "
                               f"{m['dataset_fingerprint'][:12]}, this one {data.fingerprint[:12]}); "
                               "run `grouter dispatch` on this dataset")
        if grouter_fingerprint is not None and grouter_fingerprint != m["grouter_fingerprint"]:
            raise GrouterError(f"routing store {self.path} was made with another Grouter (fingerprint "
                               f"{m['grouter_fingerprint'][:12]}, expected {grouter_fingerprint[:12]}); "
                               "run `grouter dispatch` with this Grouter")

    def verify(self, split: str | None = None) -> None:
        """Check every byte of the store (of one split) against its checksums now (``grouter verify``)."""
        for (name, _), checked in self._files.items():
            if split in (None, name):
                checked.check_all()

    def _checked(self, split: str, kind: str, idx: np.ndarray | None, itemsize: int) -> None:
        """Verify the rows about to be read (all of them when ``idx`` is None)."""
        if not self._verify:
            return
        checked = self._files[split, kind]
        if idx is None:
            checked.check_all()
        else:
            row = math.prod(self.row_shape) * itemsize
            checked.check_rows(np.asarray(idx, dtype=np.int64) * row, row)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def causal(self) -> bool:
        return bool(self.manifest.get("causal", True))

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One sequence's ids (or weights): ``(seq_len, k)``, or ``(seq_len, H, k)`` with per-layer heads."""
        return row_shape(self.seq_len, self.k, self.heads)

    def n_sequences(self, split: str) -> int:
        if split not in self.manifest["splits"]:
            raise GrouterError(f"routing store {self.path} has no split {split!r}; "
                               f"it has {', '.join(self.manifest['splits'])}")
        return int(self.manifest["splits"][split]["n_sequences"])

    def _map(self, split: str, suffix: str, dtype: np.dtype) -> np.ndarray:
        shape = (self.n_sequences(split), *self.row_shape)
        if shape[0] == 0:  # an empty file cannot be mapped
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path / f"{split}.{suffix}", dtype=dtype, mode="r", shape=shape)

    def ids(self, split: str) -> np.ndarray:
        """Expert ids ``[n_sequences, seq_len, k]`` (``[n_sequences, seq_len, H, k]`` with per-layer
        heads; uint8 or uint16), memory-mapped read-only, all of them verified first (the caller is
        about to read them all)."""
        self._checked(split, "ids", None, self.ids_dtype.itemsize)
        return self._map(split, "ids", self.ids_dtype)

    def raw_weights(self, split: str) -> np.ndarray:
        """Gate weights as stored: the 16-bit patterns (uint16), shaped like :meth:`ids`, verified."""
        self._checked(split, "weights", None, 2)
        return self._map(split, "weights", np.dtype(np.uint16))

    def weights(self, split: str, idx: np.ndarray | None = None) -> torch.Tensor:
        """Gate weights as float32, of sequences ``idx`` (all when None)."""
        if idx is None:
            raw = np.asarray(self.raw_weights(split))
        else:
            self._checked(split, "weights", idx, 2)
            raw = self._map(split, "weights", np.dtype(np.uint16))[np.asarray(idx, dtype=np.int64)]
        bits = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16))
        return bits.view(WEIGHTS_DTYPES[self.manifest["weights_dtype"]]).float()

    def routing(self, split: str, idx: np.ndarray) -> Routing:
        """The stored routing of sequences ``idx``: ids long ``[B, L, k]``, weights float32 ``[B, L, k]``;
        with per-layer heads ``[B, L, H, k]`` and ``heads`` set (each layer of a model takes its
        head's, :meth:`Routing.for_layer`)."""
        idx = np.asarray(idx, dtype=np.int64)
        self._checked(split, "ids", idx, self.ids_dtype.itemsize)
        ids = np.asarray(self._map(split, "ids", self.ids_dtype)[idx])
        if ids.size and int(ids.max()) >= self.n_experts:
            raise GrouterError(f"routing store {self.path} holds expert id {int(ids.max())} for {self.n_experts} "
                               f"experts in {split} sequences {idx.min()}..{idx.max()}; {self._redo}")
        return Routing(torch.from_numpy(ids.astype(np.int64)), self.weights(split, idx), heads=self.heads)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={i['n_sequences']}" for s, i in self.manifest["splits"].items())
        heads = "" if self.heads is None else f", head_layers={list(self.heads.layers)}"
        return f"RoutingStore({str(self.path)!r}, k={self.k}, n_experts={self.n_experts}{heads}, {sizes})"
