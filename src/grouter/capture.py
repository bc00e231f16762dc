"""Capture: record the routing scores of MoE layers of a source model for every token of a dataset.

The targets are what distillation learns from, so the teacher never re-runs. Layout of a
targets directory:
- ``targets.json``: manifest (format, dataset fingerprint, source provenance, E, k, checksums,
  and what the scores are: ``score_function`` ``softmax`` for raw gate logits, ``sigmoid`` for
  sources that select by sigmoid scores, and ``includes_bias``: whether a gate or selection bias is
  part of them); the captured ``layer`` (version 2), or ``layers`` and the source's depth
  ``source_layers`` (version 3: several layers, one Grouter head each);
- ``{split}.logits``: float16 ``[n_sequences, seq_len, E]`` (one layer) or ``[n_sequences,
  seq_len, H, E]`` (H layers), one row per *input* token of each packed sequence, in the dataset's
  order (memory-mapped on read).

One layer is written exactly as before per-layer heads existed (version 2), so such targets read
the same in older and newer grouters.

A source is anything that follows :class:`RouterPrefix`: the built-in MoE LM here, Hugging Face
MoE checkpoints in :mod:`grouter.hf_source`. Only the prefix of the source that feeds the captured
gate is loaded and run (docs/method.md#capture).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from .artifacts import ResumableDir, read_manifest, refuse_existing, write_json
from .data import SPLITS, PackedDataset, batches_of
from .device import resolve_device
from .errors import GrouterError
from .hf_source import HFRouterPrefix, describe_gates, is_hf_model_dir, resolve_layers
from .integrity import CheckedFile, file_checksum, file_sha256, verify_file
from .loop import finished_checkpoint
from .model import MoEConfig, MoELM, read_config
from .routers import AuxFreeRouter, Heads, RandomRouter, score_shape

TARGETS_FORMAT = "grouter-targets"
TARGETS_VERSION = 3  # 2: per-chunk checksums, verified on read; 3: several layers (written only for them)
ONE_LAYER_VERSION = 2


class RouterPrefix(Protocol):
    """What capture needs of a source model: the scores its routers select experts by, per token.

    ``router_logits(input_ids [B, L])`` returns float32 ``[B, L, E]`` for one captured layer,
    ``[B, L, H, E]`` for H (``layers``, in increasing order, of the source's ``n_layers``): the
    scores whose top-k are the source's routing (raw gate logits for softmax routers; sigmoid
    scores plus the selection bias for aux-loss-free routers). ``score_function`` and
    ``includes_bias`` say which; ``describe()`` gives the exact formula (``scores``) and how experts
    are selected from them (``selection``: ``topk``, or ``group_limited_topk`` for DeepSeek-V3-style
    routers).
    """

    layers: list[int]
    n_layers: int
    n_experts: int
    top_k: int
    vocab_size: int
    score_function: str
    includes_bias: bool
    loaded_tensor_names: list[str]

    def router_logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...

    def check_tokenizer(self, data: PackedDataset) -> None: ...


class BuiltinRouterPrefix:
    """The prefix of a built-in MoE checkpoint up to the router of its deepest captured layer.

    Loads only the embedding, the blocks before that layer and, of that layer, the attention, the
    norms and the router: never its experts nor later blocks. ``layer`` (one) or ``layers`` (several,
    or ``"all"``) say which routers.
    """

    def __init__(self, path: str | Path, layer: int | None = None, device: torch.device | str = "cpu", *,
                 layers=None):
        path = finished_checkpoint(Path(path), "grouter source train")
        self.path = path
        meta = read_config(path)
        verify_file(path / "model.safetensors", meta.get("weights_sha256"), "source weights",
                    "re-create the source with `grouter source train`")
        cfg = MoEConfig.from_dict(meta["config"])
        self.n_layers = cfg.n_layers
        self.layers = resolve_layers(layer, layers, list(range(cfg.n_layers)), cfg.n_layers, "the source")
        if cfg.router in ("external", "hash", "stablemoe"):
            raise GrouterError(f"the source routes with {cfg.router!r}: its gate logits are not its learned routing; "
                               "capture from a source trained with a learned router (aux, zloss, auxfree, none)")
        self.data_info = meta.get("data", {})
        self.n_experts, self.top_k, self.vocab_size = cfg.n_experts, cfg.top_k, cfg.vocab_size
        # An aux-loss-free router selects by sigmoid scores plus its selection bias: record those.
        self.score_function = "sigmoid" if cfg.router == "auxfree" else "softmax"
        self.includes_bias = cfg.router == "auxfree"
        self.device = torch.device(device)
        self.model = self._load_prefix(meta["config"])

    @property
    def layer(self) -> int:
        """The captured layer, when one is captured."""
        if len(self.layers) > 1:
            raise GrouterError(f"this prefix captures layers {self.layers}; use .layers")
        return self.layers[0]

    def _load_prefix(self, config: dict) -> MoELM:
        """The blocks up to the deepest captured layer, with the weights of everything but that
        layer's experts."""
        last = self.layers[-1]
        model = MoELM(MoEConfig(**{**config, "n_layers": last + 1}))
        block = f"blocks.{last}.moe."
        wanted = sorted(k for k in model.state_dict() if k.startswith(("embed.", "blocks."))
                        and (not k.startswith(block) or k.startswith(block + "router.")))
        self.loaded_tensor_names = wanted
        try:
            with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
                missing = set(wanted) - set(f.keys())
                if missing:
                    raise GrouterError(f"source checkpoint {self.path} lacks {sorted(missing)[0]}; it is corrupt")
                state = {k: f.get_tensor(k) for k in wanted}
        except (OSError, RuntimeError) as e:  # safetensors reports a bad header as these
            raise GrouterError(f"source weights in {self.path} are corrupt or truncated "
                               f"({str(e).splitlines()[0]})") from None
        model.load_state_dict(state, strict=False)
        return model.to(self.device).eval()

    @torch.no_grad()
    def router_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, E]`` (one layer) or ``[B, L, H, E]``: each captured router's scores from its input."""
        m, l = self.model, input_ids.shape[1]
        cos, sin = m.rope_cos[:l], m.rope_sin[:l]
        ids = input_ids.to(self.device)
        x = m.embed(ids)
        scores = []
        for i, block in enumerate(m.blocks):  # Block.forward, unrolled to see each router's input
            x = x + block.attn(block.attn_norm(x), cos, sin)
            h = block.moe_norm(x)
            if i in self.layers:
                scores.append(self._scores(block.moe.router, h.float()))
            if i < self.layers[-1]:
                x = x + block.moe(h, ids, None)[0]
        return scores[0] if len(scores) == 1 else torch.stack(scores, dim=2)

    @staticmethod
    def _scores(router, h: torch.Tensor) -> torch.Tensor:
        weight = router.weight if isinstance(router, RandomRouter) else router.gate.weight
        logits = h @ weight.float().T
        if isinstance(router, AuxFreeRouter):
            return logits.sigmoid() + router.bias.float()
        return logits

    def describe(self) -> dict:
        scores = "sigmoid(H @ W^T) + b" if self.includes_bias else "H @ W^T"
        return {"kind": "builtin", "path": str(self.path), "n_experts": self.n_experts,
                "top_k": self.top_k, "weights_sha256": file_sha256(self.path / "model.safetensors"),
                "score_function": self.score_function, "includes_bias": self.includes_bias, "selection": "topk",
                **describe_gates([{"layer": x, "scores": scores} for x in self.layers], self.n_layers)}

    def check_tokenizer(self, data: PackedDataset) -> None:
        src = self.data_info.get("tokenizer_sha256")
        if src and src != data.meta.get("tokenizer_sha256"):
            raise GrouterError("the dataset was tokenized with another tokenizer than the source model's; "
                               "re-tokenize it with the source's tokenizer")


def open_source(path: str | Path, layer: int | None, device, layers=None) -> RouterPrefix:
    """A built-in checkpoint or a Hugging Face MoE directory, as a router prefix."""
    path = Path(path)
    if not path.exists():
        raise GrouterError(f"source {path} not found; pass a `grouter source train` output or a Hugging Face MoE "
                           "model directory")
    if is_hf_model_dir(path):
        return HFRouterPrefix(path, layer=layer, device=device, layers=layers)
    return BuiltinRouterPrefix(path, layer=layer, device=device, layers=layers)


def check_vocab_against_source(prefix: RouterPrefix, data: PackedDataset) -> None:
    if data.vocab_size > prefix.vocab_size:
        raise GrouterError(f"the dataset's vocabulary ({data.vocab_size}) is larger than the source's embedding "
                           f"({prefix.vocab_size} rows): it was tokenized with another tokenizer")
    prefix.check_tokenizer(data)


# Flush the targets and record progress every this many batches.
CHECKPOINT_EVERY = 64


def _capture_split(prefix: RouterPrefix, split, job: ResumableDir, batch_size: int, progress: bool) -> dict:
    """Fill ``{split}.logits`` from where the last run of this job stopped; returns its manifest entry."""
    n, name = len(split), split.name
    path = job.work / f"{name}.logits"
    start = job.done(name)
    mode = "r+" if path.exists() and start else "w+"
    shape = (n, split.seq_len, *score_shape(len(prefix.layers), prefix.n_experts))
    targets = np.memmap(path, dtype=np.float16, mode=mode, shape=shape)
    bar = tqdm(total=n, initial=start, desc=f"capture {name}", unit="seq", disable=not progress, mininterval=2)
    for i, idx in enumerate(batches_of(n, batch_size, start)):
        scores = prefix.router_logits(split.batch(idx)["input_ids"])
        half = scores.to(torch.float16).cpu().numpy()
        if not np.isfinite(half).all():
            bad = "non-finite" if not torch.isfinite(scores).all() else "beyond float16 range"
            raise GrouterError(f"the source produced {bad} router scores for {name} sequence {idx[0]}+; "
                               "is the source checkpoint corrupt?")
        targets[idx] = half
        if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 or idx[-1] == n - 1:
            targets.flush()
            job.set_done(name, int(idx[-1]) + 1)
        bar.update(len(idx))
    bar.close()
    targets.flush()
    del targets
    return {"n_sequences": n, "logits": file_checksum(path)}


def _layer_fields(prefix: RouterPrefix) -> dict:
    """The manifest's version and captured layers: one layer as in version 2, several as version 3."""
    if len(prefix.layers) == 1:
        return {"version": ONE_LAYER_VERSION, "layer": prefix.layers[0]}
    return {"version": TARGETS_VERSION, "layers": prefix.layers, "source_layers": prefix.n_layers}


def capture(source: str | Path, data: PackedDataset, out: str | Path, layer: int | None = None,
            batch_size: int = 16, device: str = "auto", overwrite: bool = False, progress: bool = True,
            layers: list[int] | str | None = None) -> dict:
    """Write the targets directory ``out``; resumable (rerun the same command) and atomic.

    ``layer``: the one MoE layer to capture (default: the first); ``layers``: several (a list of
    indices, or ``"all"`` MoE layers), one Grouter head each (docs/method.md#capture).
    """
    refuse_existing(out, overwrite)  # before the source loads: that can take minutes
    prefix = open_source(source, layer, resolve_device(device), layers)
    check_vocab_against_source(prefix, data)
    source_info, fields = prefix.describe(), _layer_fields(prefix)
    identity = {"dataset": data.fingerprint, "source": source_info, "version": fields["version"]}
    job = ResumableDir(out, identity, overwrite=overwrite)
    if job.resumed:
        print(f"resuming capture in {job.work}", file=sys.stderr)
    splits = {name: _capture_split(prefix, data.split(name), job, batch_size, progress) for name in SPLITS}
    manifest = {"format": TARGETS_FORMAT, **fields, "dataset_fingerprint": data.fingerprint,
                "dataset_path": str(data.path.resolve()), "seq_len": data.seq_len, "n_experts": prefix.n_experts,
                "top_k": prefix.top_k, "vocab_size": data.vocab_size, "dtype": "float16",
                "score_function": prefix.score_function, "includes_bias": prefix.includes_bias,
                "scores": source_info["scores"], "selection": source_info["selection"],
                "source": source_info, "splits": splits}
    write_json(job.work / "targets.json", manifest)
    job.finish()
    return {"targets": str(out), "n_experts": prefix.n_experts, "top_k": prefix.top_k,
            **{key: fields[key] for key in ("layer", "layers") if key in fields},
            "score_function": prefix.score_function, "train_tokens": splits["train"]["n_sequences"] * data.seq_len}


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
        data = data or PackedDataset.open(m["dataset_path"])
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
