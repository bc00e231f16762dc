"""Capture: record a source MoE's raw router logits (one layer) for every token of a dataset.

The targets are what distillation learns from, so the teacher never re-runs. Layout of a
targets directory:
- ``targets.json``: manifest (format, dataset fingerprint, source provenance, E, k, checksums);
- ``{split}.logits``: float16 ``[n_sequences, seq_len, E]``, one row per *input* token of each
  packed sequence, in the dataset's order (memory-mapped on read).

Only the prefix of the source that feeds the captured gate is loaded and run (SPEC §1.2).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from .artifacts import ResumableDir, read_json, read_manifest, sha256_file, write_json
from .data import PackedDataset
from .errors import GrouterError
from .model import MoEConfig, MoELM
from .routers import HashRouter, RandomRouter
from .train import resolve_device

TARGETS_FORMAT, TARGETS_VERSION = "grouter-targets", 1


class BuiltinRouterPrefix:
    """The prefix of a built-in MoE checkpoint up to the router of one layer.

    Loads only the embedding, the blocks before ``layer`` and, of that layer, the attention, the
    norms and the router: never its experts nor later blocks.
    """

    def __init__(self, path: str | Path, layer: int | None = None, device: torch.device | str = "cpu"):
        path = Path(path)
        if (path / "checkpoint" / "config.json").exists():
            path = path / "checkpoint"  # a training run directory
        self.path = path
        meta = read_json(path / "config.json", "source model config")
        cfg = MoEConfig.from_dict(meta["config"])
        self.layer = 0 if layer is None else layer
        if not 0 <= self.layer < cfg.n_layers:
            raise GrouterError(f"layer {self.layer} is out of range: the source has MoE layers 0..{cfg.n_layers - 1}")
        if cfg.router in ("external", "hash"):
            raise GrouterError(f"the source routes with {cfg.router!r}: its gate logits are not its routing; "
                               "capture from a source trained with a learned router (aux, zloss, auxfree, none)")
        self.data_info = meta.get("data", {})
        self.n_experts, self.top_k, self.vocab_size = cfg.n_experts, cfg.top_k, cfg.vocab_size
        self.model = MoELM(MoEConfig(**{**meta["config"], "n_layers": self.layer + 1}))
        block = f"blocks.{self.layer}.moe."
        wanted = {k for k in self.model.state_dict() if not k.startswith(block) or k.startswith(block + "router.")}
        self.loaded_tensor_names = sorted(wanted)
        state = {}
        try:
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                missing = wanted - set(f.keys())
                if missing:
                    raise GrouterError(f"source checkpoint {path} lacks {sorted(missing)[0]}; it is corrupt")
                state = {k: f.get_tensor(k) for k in sorted(wanted)}
        except (OSError, RuntimeError) as e:  # safetensors reports a bad header as these
            raise GrouterError(f"source weights in {path} are corrupt or truncated ({str(e).splitlines()[0]})") from None
        self.model.load_state_dict(state, strict=False)
        self.model.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def router_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        m, l = self.model, input_ids.shape[1]
        cos, sin = m.rope_cos[:l], m.rope_sin[:l]
        x = m.embed(input_ids.to(self.device))
        for block in m.blocks[: self.layer]:
            x = block(x, cos, sin, input_ids, None)[0]
        last = m.blocks[self.layer]
        x = x + last.attn(last.attn_norm(x), cos, sin)
        h = last.moe_norm(x).float()
        router = last.moe.router
        weight = router.weight if isinstance(router, RandomRouter) else router.gate.weight
        return h @ weight.float().T

    def describe(self) -> dict:
        return {"kind": "builtin", "path": str(self.path), "layer": self.layer, "n_experts": self.n_experts,
                "top_k": self.top_k, "weights_sha256": sha256_file(self.path / "model.safetensors")}

    def check_tokenizer(self, data: PackedDataset) -> None:
        src = self.data_info.get("tokenizer_sha256")
        if src and src != data.meta.get("tokenizer_sha256"):
            raise GrouterError("the dataset was tokenized with another tokenizer than the source model's; "
                               "re-tokenize it with the source's tokenizer")


def open_source(path: str | Path, layer: int | None, device) -> "BuiltinRouterPrefix":
    """A built-in checkpoint or a Hugging Face MoE directory, as a router prefix."""
    path = Path(path)
    if not path.exists():
        raise GrouterError(f"source {path} not found; pass a `grouter source train` output or a Hugging Face MoE model directory")
    from .hf_source import HFRouterPrefix, is_hf_model_dir

    if is_hf_model_dir(path):
        return HFRouterPrefix(path, layer=layer, device=device)
    return BuiltinRouterPrefix(path, layer=layer, device=device)


def check_vocab_against_source(prefix, data: PackedDataset) -> None:
    if data.vocab_size > prefix.vocab_size:
        raise GrouterError(f"the dataset's vocabulary ({data.vocab_size}) is larger than the source's embedding "
                           f"({prefix.vocab_size} rows): it was tokenized with another tokenizer")
    check = getattr(prefix, "check_tokenizer", None)
    if check is not None:
        check(data)


def capture(source: str | Path, data: PackedDataset, out: str | Path, layer: int | None = None,
            batch_size: int = 16, device: str = "auto", overwrite: bool = False, progress: bool = True) -> dict:
    """Write the targets directory ``out``; resumable (rerun the same command) and atomic."""
    dev = resolve_device(device)
    prefix = open_source(source, layer, dev)
    check_vocab_against_source(prefix, data)
    source_info = prefix.describe()
    identity = {"dataset": data.fingerprint, "source": source_info, "version": TARGETS_VERSION}
    job = ResumableDir(out, identity, overwrite=overwrite)
    if job.resumed:
        print(f"resuming capture in {job.work}", file=sys.stderr)
    E, L = prefix.n_experts, data.seq_len
    splits = {}
    for name in ("train", "val"):
        split = data.split(name)
        n = len(split)
        path = job.work / f"{name}.logits"
        mode = "r+" if path.exists() and job.done(name) else "w+"
        targets = np.memmap(path, dtype=np.float16, mode=mode, shape=(n, L, E))
        start = job.done(name)
        bar = tqdm(total=n, initial=start, desc=f"capture {name}", unit="seq", disable=not progress, mininterval=2)
        for lo in range(start, n, batch_size):
            idx = np.arange(lo, min(lo + batch_size, n))
            logits = prefix.router_logits(split.batch(idx)["input_ids"])
            half = logits.to(torch.float16).cpu().numpy()
            if not np.isfinite(half).all():
                bad = "non-finite" if not torch.isfinite(logits).all() else "beyond float16 range"
                raise GrouterError(f"the source produced {bad} router logits for {name} sequence {lo}+; "
                                   "is the source checkpoint corrupt?")
            targets[idx] = half
            if (lo // batch_size) % 64 == 63 or idx[-1] == n - 1:
                targets.flush()
                job.set_done(name, int(idx[-1]) + 1)
            bar.update(len(idx))
        bar.close()
        targets.flush()
        del targets
        splits[name] = {"n_sequences": n, "sha256": sha256_file(path)}
    manifest = {"format": TARGETS_FORMAT, "version": TARGETS_VERSION, "dataset_fingerprint": data.fingerprint,
                "dataset_path": str(data.path.resolve()), "seq_len": L, "n_experts": E, "top_k": prefix.top_k,
                "vocab_size": data.vocab_size, "dtype": "float16", "source": source_info, "splits": splits}
    write_json(job.work / "targets.json", manifest)
    job.finish()
    return {"targets": str(out), "n_experts": E, "top_k": prefix.top_k, "layer": source_info["layer"],
            "train_tokens": splits["train"]["n_sequences"] * L}


@dataclass
class Targets:
    """Captured teacher logits, memory-mapped and validated against their dataset."""

    path: Path
    manifest: dict
    data: PackedDataset

    @classmethod
    def open(cls, path: str | Path, data: PackedDataset | None = None, verify: bool = True) -> "Targets":
        path = Path(path)
        m = read_manifest(path, "targets.json", TARGETS_FORMAT, TARGETS_VERSION, "targets directory", "grouter capture")
        data = data or PackedDataset.open(m["dataset_path"])
        if data.fingerprint != m["dataset_fingerprint"]:
            raise GrouterError(f"targets in {path} were captured for another dataset (fingerprint "
                               f"{m['dataset_fingerprint'][:12]}, this one {data.fingerprint[:12]}); capture again")
        targets = cls(path, m, data)
        for name, info in m["splits"].items():
            file = path / f"{name}.logits"
            expected = info["n_sequences"] * m["seq_len"] * m["n_experts"] * 2
            if not file.is_file() or file.stat().st_size != expected:
                raise GrouterError(f"targets file {file} is missing or truncated; capture again")
            if verify:
                targets.check_finite(name)
        return targets

    @property
    def n_experts(self) -> int:
        return self.manifest["n_experts"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    def array(self, split: str) -> np.memmap:
        n = self.manifest["splits"][split]["n_sequences"]
        return np.memmap(self.path / f"{split}.logits", dtype=np.float16, mode="r",
                         shape=(n, self.manifest["seq_len"], self.n_experts))

    def check_finite(self, split: str, chunk: int = 256) -> None:
        """Refuse NaN/inf in teacher logits up front rather than training on garbage."""
        arr = self.array(split)
        for lo in range(0, len(arr), chunk):
            if not np.isfinite(arr[lo:lo + chunk]).all():
                raise GrouterError(f"targets {self.path}/{split}.logits contain NaN or inf near sequence {lo}; "
                                   "capture again from a sound source")

    def logits(self, split: str, idx: np.ndarray) -> torch.Tensor:
        """Teacher logits for sequences ``idx``: float32 ``[B, seq_len, E]``."""
        return torch.from_numpy(self.array(split)[idx].astype(np.float32))
