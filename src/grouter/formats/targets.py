"""The targets format: a source's captured router scores for every token of a dataset.

What distillation learns from, so the teacher never re-runs. Layout of a targets directory:

- ``targets.json``: manifest (format, dataset fingerprint, source provenance, E, k, checksums,
  and what the scores are: ``score_function`` ``softmax`` for raw gate logits, ``sigmoid`` for
  sources that select by sigmoid scores, and ``includes_bias``: whether a gate or selection bias is
  part of them); the captured ``layer`` (version 2), or ``layers`` and the source's depth
  ``source_layers`` (version 3: several layers, one Grouter head each);
- ``{split}.logits``: float16 ``[n_sequences, seq_len, E]`` (one layer) or ``[n_sequences,
  seq_len, H, E]`` (H layers), one row per *input* token of each packed sequence, in the dataset's
  order (memory-mapped on read).

One layer is written exactly as before per-layer heads existed (version 2), so such targets read
the same in older and newer grouters. :mod:`grouter.capture` fills the files
(:func:`logits_map`) and writes the manifest (:func:`write_manifest`); :class:`Targets` reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import read_manifest, reserve, write_json
from .dataset import PackedDataset
from ..errors import GrouterError
from ..integrity import CheckedFile, file_checksum
from ..routers import Heads, score_shape

TARGETS_FORMAT = "grouter-targets"
TARGETS_VERSION = 3  # 2: per-chunk checksums, verified on read; 3: several layers (written only for them)
ONE_LAYER_VERSION = 2


# -- writing ------------------------------------------------------------------------------------

def layer_fields(layers: list[int], source_layers: int) -> dict:
    """The manifest's version and captured layers: one layer as in version 2, several as version 3."""
    if len(layers) == 1:
        return {"version": ONE_LAYER_VERSION, "layer": layers[0]}
    return {"version": TARGETS_VERSION, "layers": list(layers), "source_layers": source_layers}


def logits_map(path: Path, n: int, seq_len: int, layers: int, n_experts: int, resume: bool) -> np.memmap:
    """The writable ``{split}.logits`` of ``n`` sequences (kept as it is when ``resume``), its bytes
    reserved on disk first."""
    shape = (n, seq_len, *score_shape(layers, n_experts))
    if not resume:
        with open(path, "wb") as f:
            reserve(f, math.prod(shape) * 2, path)
    return np.memmap(path, dtype=np.float16, mode="r+", shape=shape)


def split_entry(path: Path, n: int) -> dict:
    """A split's manifest entry, once its file is complete."""
    return {"n_sequences": n, "logits": file_checksum(path)}


def write_manifest(work: Path, data: PackedDataset, fields: dict, source: dict, n_experts: int, top_k: int,
                   splits: dict) -> None:
    """``targets.json``: ``fields`` from :func:`layer_fields`; ``source`` the source's description
    (its ``score_function``, ``includes_bias``, ``scores`` and ``selection`` among them)."""
    write_json(work / "targets.json", {
        "format": TARGETS_FORMAT, **fields, "dataset_fingerprint": data.fingerprint,
        "dataset_path": str(data.path.resolve()), "seq_len": data.seq_len, "n_experts": n_experts, "top_k": top_k,
        "vocab_size": data.vocab_size, "dtype": "float16", "score_function": source["score_function"],
        "includes_bias": source["includes_bias"], "scores": source["scores"], "selection": source["selection"],
        "source": source, "splits": splits})


# -- reading ------------------------------------------------------------------------------------


@dataclass
class Targets:
    """Captured teacher scores, memory-mapped, validated against their dataset, and checked against
    their per-chunk checksums as they are read."""

    path: Path
    manifest: dict
    data: PackedDataset
    files: dict = field(default_factory=dict, repr=False)  # split -> CheckedFile

    @classmethod
    def open(cls, path: str | Path, data: PackedDataset | None = None, verify: bool = True) -> "Targets":
        """``verify``: also read every score once now, refusing NaN or inf (distillation reads them all)."""
        path = Path(path)
        m = read_manifest(path, "targets.json", TARGETS_FORMAT, (ONE_LAYER_VERSION, TARGETS_VERSION), "targets directory",
                          "grouter capture")
        if data is None:
            try:
                data = PackedDataset.open(m["dataset_path"])
            except GrouterError as e:
                raise GrouterError(f"targets in {path} were captured for the dataset at {m['dataset_path']}, which is "
                                   f"gone or damaged ({e}); restore it there, or capture again") from None
        if data.fingerprint != m["dataset_fingerprint"]:
            raise GrouterError(f"targets in {path} were captured for another dataset (fingerprint "
                               f"{m['dataset_fingerprint'][:12]}, this one {data.fingerprint[:12]}); capture again")
        redo = f"capture again with `grouter capture --out {path} --overwrite`"
        files = {name: CheckedFile(path / f"{name}.logits", info.get("logits"), "targets file", redo)
                 for name, info in m["splits"].items()}
        targets = cls(path, m, data, files)
        if verify:
            for name in files:
                targets.check_finite(name)
        return targets

    @property
    def n_experts(self) -> int:
        return self.manifest["n_experts"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def layers(self) -> list[int]:
        """The captured source layers, in increasing order (one Grouter head each when several)."""
        return list(self.manifest.get("layers", [self.manifest.get("layer")]))

    @property
    def heads(self) -> Heads | None:
        """Where per-layer heads come from (None: one layer captured, one shared head)."""
        return Heads.of(self.layers, self.manifest.get("source_layers", 0))

    @property
    def score_shape(self) -> tuple[int, ...]:
        return score_shape(len(self.layers), self.n_experts)

    @property
    def row_bytes(self) -> int:
        return self.manifest["seq_len"] * math.prod(self.score_shape) * 2

    def array(self, split: str) -> np.memmap:
        """The raw float16 scores (unverified: read them through :meth:`logits` or after :meth:`check_finite`)."""
        n = self.manifest["splits"][split]["n_sequences"]
        return np.memmap(self.path / f"{split}.logits", dtype=np.float16, mode="r",
                         shape=(n, self.manifest["seq_len"], *self.score_shape))

    def check_finite(self, split: str, chunk: int = 256) -> None:
        """Verify every chunk, and refuse NaN/inf in teacher scores up front rather than training on garbage."""
        self.files[split].check_all()
        arr = self.array(split)
        for lo in range(0, len(arr), chunk):
            if not np.isfinite(arr[lo:lo + chunk]).all():
                raise GrouterError(f"targets {self.path}/{split}.logits contain NaN or inf near sequence {lo}; "
                                   "capture again from a sound source")

    def logits(self, split: str, idx: np.ndarray) -> torch.Tensor:
        """Teacher scores for sequences ``idx``: float32 ``[B, seq_len, E]``, or ``[B, seq_len, H, E]``
        for H captured layers."""
        idx = np.asarray(idx, dtype=np.int64)
        self.files[split].check_rows(idx * self.row_bytes, self.row_bytes)
        return torch.from_numpy(self.array(split)[idx].astype(np.float32))
