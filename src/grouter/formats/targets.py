"""The targets format: a source's captured router scores for every token of a dataset.

What distillation learns from, so the teacher never re-runs. Layout of a targets directory:

- ``targets.json``: manifest (format, dataset fingerprint, source provenance, E, k, checksums,
  and what the scores are: ``score_function`` ``softmax`` for raw gate logits, ``sigmoid`` for
  sources that select by sigmoid scores, and ``includes_bias``: whether a gate or selection bias is
  part of them); the captured ``layer`` (version 2), or ``layers`` and the source's depth
  ``source_layers`` (version 3: several layers, one Grouter head each); ``top_m`` (version 4:
  compact targets);
- ``{split}.logits``: float16 ``[n_sequences, seq_len, E]`` (one layer) or ``[n_sequences,
  seq_len, H, E]`` (H layers), one row per *input* token of each packed sequence, in the dataset's
  order (memory-mapped on read);
- or, compact (``top_m`` M): ``{split}.topm`` (float16 ``[..., M]``, the M highest scores, best
  first), ``{split}.topm_ids`` (their experts, uint8 or uint16) and ``{split}.rest`` (float32
  ``[...]``, the log-sum-exp of the others), with the same leading axes (:func:`file_layout`).

One full layer is written exactly as before per-layer heads existed (version 2), and several full
layers as before compact targets (version 3), so such targets read the same in older and newer
grouters. :mod:`grouter.capture` fills the files (:class:`TargetsWriter`) and writes the manifest
(:func:`write_manifest`); :class:`Targets` reads them, and gives distillation a :class:`Teacher`
per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..artifacts import read_manifest, reserve, write_json
from ..errors import GrouterError
from ..integrity import CheckedFile, file_checksum
from ..losses import kept_kl_loss, kl_loss
from ..routers import Heads, score_shape
from .dataset import PackedDataset
from .store import ids_dtype_for

TARGETS_FORMAT = "grouter-targets"
TARGETS_VERSION = 4  # 2: per-chunk checksums; 3: several layers; 4: compact, top-M (each written only for them)
SEVERAL_LAYERS_VERSION = 3
ONE_LAYER_VERSION = 2
DEFAULT_TOP_M_PER_K = 2  # capture's default compact targets: the top 2k scores (resolve_top_m)


# -- writing ------------------------------------------------------------------------------------

def layer_fields(layers: list[int], source_layers: int, top_m: int = 0) -> dict:
    """The manifest's version, captured layers and compaction: one full layer as in version 2,
    several as version 3, compact targets (``top_m``) as version 4."""
    fields = ({"version": ONE_LAYER_VERSION, "layer": layers[0]} if len(layers) == 1 else
              {"version": SEVERAL_LAYERS_VERSION, "layers": list(layers), "source_layers": source_layers})
    return {**fields, "version": TARGETS_VERSION, "top_m": top_m} if top_m else fields


def file_layout(n_layers: int, n_experts: int, top_m: int = 0) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each file of a split (by suffix): its dtype and the trailing shape of one token.

    Full targets: ``logits``, every score. Compact targets (``top_m`` M): ``topm``, the M highest
    scores in decreasing order; ``topm_ids``, their experts; ``rest``, the log-sum-exp (float32) of
    the E - M others: the softmax of every score is then exact for the kept experts and the rest is
    one "other" bucket (docs/method.md#compact-targets)."""
    lead = () if n_layers == 1 else (n_layers,)
    if not top_m:
        return {"logits": (np.dtype(np.float16), (*lead, n_experts))}
    return {"topm": (np.dtype(np.float16), (*lead, top_m)), "topm_ids": (ids_dtype_for(n_experts), (*lead, top_m)),
            "rest": (np.dtype(np.float32), lead)}


def bytes_per_token(n_layers: int, n_experts: int, top_m: int = 0) -> int:
    """Bytes of targets per token, every captured layer (what :func:`file_layout`'s files hold)."""
    return sum(dtype.itemsize * math.prod(shape) for dtype, shape in file_layout(n_layers, n_experts, top_m).values())


def check_top_m(top_m: int, n_experts: int, top_k: int) -> None:
    if top_m and not top_k <= top_m < n_experts:
        raise GrouterError(f"--top-m {top_m} must keep at least the source's top-k ({top_k}) and fewer than its "
                           f"{n_experts} experts; use 0 to keep every score")


def resolve_top_m(top_m: int | None, n_experts: int, top_k: int) -> int:
    """The M to capture: ``top_m`` (0: every score) checked, or by default (None) ``DEFAULT_TOP_M_PER_K``
    times the source's top-k where that is fewer than its experts (else every score). The default is
    measured: at M = 2k distillation's top-k recall and the target's speedup matched every score's
    (docs/study.md#at-a-real-sources-scale-compact-targets-and-head-groups---study-scale)."""
    if top_m is None:
        top_m = DEFAULT_TOP_M_PER_K * top_k if DEFAULT_TOP_M_PER_K * top_k < n_experts else 0
    check_top_m(top_m, n_experts, top_k)
    return top_m


def check_temperature(top_m: int, temperature: float) -> None:
    if top_m and temperature != 1.0:
        raise GrouterError("compact targets keep the other scores' log-sum-exp at temperature 1; distill them with "
                           "--temperature 1, or capture full targets (--top-m 0)")


@dataclass
class TargetsWriter:
    """Writes the score files of a targets directory in ``work``, in any order of splits and sequence
    ranges (several processes can fill disjoint windows of the same files): :meth:`allocate` sizes a
    split's files, :meth:`maps` opens a window, :meth:`put` writes scores, :meth:`entry` checksums."""

    work: Path
    seq_len: int
    n_layers: int
    n_experts: int
    top_m: int = 0

    def __post_init__(self):
        self.work = Path(self.work)
        self.layout = file_layout(self.n_layers, self.n_experts, self.top_m)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.n_layers, self.n_experts, self.top_m)

    def _shape(self, kind: str) -> tuple[int, ...]:
        return (self.seq_len, *self.layout[kind][1])

    def allocate(self, split: str, n: int) -> bool:
        """Size the split's files for ``n`` sequences, reserving the bytes on disk; True when they
        already had that size (a resume)."""
        kept = True
        for kind, (dtype, _) in self.layout.items():
            path, size = self.work / f"{split}.{kind}", n * math.prod(self._shape(kind)) * dtype.itemsize
            kept = kept and path.is_file() and path.stat().st_size == size
            with open(path, "r+b" if path.exists() else "wb") as f:
                f.truncate(size)
                reserve(f, size, path)
        return kept

    def maps(self, split: str, lo: int, hi: int) -> dict[str, np.memmap] | None:
        """Read-write maps of sequences ``[lo, hi)`` of each file; None for an empty range."""
        if hi <= lo:
            return None
        return {kind: np.memmap(self.work / f"{split}.{kind}", dtype=dtype, mode="r+",
                                offset=lo * math.prod(self._shape(kind)) * dtype.itemsize,
                                shape=(hi - lo, *self._shape(kind)))
                for kind, (dtype, _) in self.layout.items()}

    def put(self, maps: dict[str, np.memmap], at: int, half: torch.Tensor) -> None:
        """Write float16 scores ``[B, seq_len, (H,) E]`` at row ``at`` of the window ``maps``."""
        b = half.shape[0]
        if not self.top_m:
            maps["logits"][at:at + b] = half.cpu().numpy()
            return
        scores = half.float()
        kept = scores.topk(self.top_m, dim=-1)
        rest = scores.scatter(-1, kept.indices, float("-inf")).logsumexp(dim=-1)
        maps["topm"][at:at + b] = kept.values.half().cpu().numpy()
        maps["topm_ids"][at:at + b] = kept.indices.cpu().numpy().astype(maps["topm_ids"].dtype)
        maps["rest"][at:at + b] = rest.cpu().numpy()

    def entry(self, split: str, n: int) -> dict:
        """A split's manifest entry, once its files are complete."""
        return {"n_sequences": n, **{kind: file_checksum(self.work / f"{split}.{kind}") for kind in self.layout}}


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
        m = read_manifest(path, "targets.json", TARGETS_FORMAT, (ONE_LAYER_VERSION, SEVERAL_LAYERS_VERSION,
                          TARGETS_VERSION), "targets directory",
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
        layout = file_layout(len(m.get("layers", [m.get("layer")])), m["n_experts"], m.get("top_m", 0))
        files = {(name, kind): CheckedFile(path / f"{name}.{kind}", info.get(kind), "targets file", redo)
                 for name, info in m["splits"].items() for kind in layout}
        targets = cls(path, m, data, files)
        if verify:
            for name in m["splits"]:
                targets.check_finite(name)
        return targets

    @property
    def n_experts(self) -> int:
        return self.manifest["n_experts"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def top_m(self) -> int:
        """Scores kept per token and layer (0: every score, full targets)."""
        return self.manifest.get("top_m", 0)

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
    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return file_layout(len(self.layers), self.n_experts, self.top_m)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of scores per token, all captured layers."""
        return bytes_per_token(len(self.layers), self.n_experts, self.top_m)

    def array(self, split: str, kind: str = "logits") -> np.memmap:
        """A raw file of ``split`` (unverified: read it through :meth:`teacher` or after
        :meth:`check_finite`): ``logits``, float16 scores of full targets; ``topm``, ``topm_ids`` or
        ``rest`` of compact ones."""
        if kind not in self.layout:
            raise GrouterError(f"targets in {self.path} hold {sorted(self.layout)} per split, not {kind!r}")
        n = self.manifest["splits"][split]["n_sequences"]
        dtype, shape = self.layout[kind]
        return np.memmap(self.path / f"{split}.{kind}", dtype=dtype, mode="r", shape=(n, self.manifest["seq_len"], *shape))

    def check_finite(self, split: str, chunk: int = 256) -> None:
        """Verify every chunk, and refuse NaN/inf in teacher scores up front rather than training on garbage."""
        for kind in self.layout:
            self.files[split, kind].check_all()
            if kind == "topm_ids":
                continue
            arr = self.array(split, kind)
            for lo in range(0, len(arr), chunk):
                if not np.isfinite(arr[lo:lo + chunk]).all():
                    raise GrouterError(f"targets {self.path}/{split}.{kind} contain NaN or inf near sequence {lo}; "
                                       "capture again from a sound source")

    def _read(self, split: str, kind: str, idx: np.ndarray) -> np.ndarray:
        dtype, shape = self.layout[kind]
        row = self.manifest["seq_len"] * math.prod(shape) * dtype.itemsize
        self.files[split, kind].check_rows(idx * row, row)
        return self.array(split, kind)[idx]

    def teacher(self, split: str, idx) -> "Teacher":
        """The teacher's scores for sequences ``idx``, as distillation uses them."""
        idx = np.asarray(idx, dtype=np.int64)
        if not self.top_m:
            return Teacher(torch.from_numpy(self._read(split, "logits", idx).astype(np.float32)))
        return Teacher(torch.from_numpy(self._read(split, "topm", idx).astype(np.float32)),
                       torch.from_numpy(self._read(split, "topm_ids", idx).astype(np.int64)),
                       torch.from_numpy(np.ascontiguousarray(self._read(split, "rest", idx))))

    def logits(self, split: str, idx: np.ndarray) -> torch.Tensor:
        """Every teacher score for sequences ``idx`` (full targets): float32 ``[B, seq_len, E]``, or
        ``[B, seq_len, H, E]`` for H captured layers."""
        if self.top_m:
            raise GrouterError(f"targets in {self.path} keep only the top {self.top_m} scores; read them with .teacher()")
        return self.teacher(split, idx).scores


@dataclass
class Teacher:
    """A batch of teacher scores: every score ``[..., E]`` (``ids`` None), or of compact targets the
    kept ``scores`` ``[..., M]`` in decreasing order, their experts ``ids`` and the log-sum-exp of
    the others, ``rest`` ``[...]``."""

    scores: torch.Tensor
    ids: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    def to(self, device) -> "Teacher":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Teacher(move(self.scores), move(self.ids), move(self.rest))

    def layer(self, h: int) -> "Teacher":
        """Captured layer ``h`` of scores ``[..., H, E]``."""
        return Teacher(self.scores[..., h, :], None if self.ids is None else self.ids[..., h, :],
                       None if self.rest is None else self.rest[..., h])

    def kl(self, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Distillation's loss against student logits ``[..., E]`` (:func:`grouter.losses.kl_loss`; of
        compact targets :func:`grouter.losses.kept_kl_loss`, at temperature 1 only)."""
        if self.ids is None:
            return kl_loss(self.scores, student, temperature)
        check_temperature(self.scores.shape[-1], temperature)
        return kept_kl_loss(self.scores, self.ids, self.rest, student)

    def topk(self, k: int) -> torch.Tensor:
        """The ids of the teacher's top-k experts, best first."""
        return self.scores.topk(k, dim=-1).indices if self.ids is None else self.ids[..., :k]
