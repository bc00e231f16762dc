"""The Grouter format: a Grouter's config and weights, as distill, fold and tune write them.

A Grouter directory holds ``model.safetensors`` and ``config.json`` (the artifact header, the
:class:`GrouterConfig`, the weights' checksum and the Grouter's fingerprint: a hash of config and
weights that routing stores are bound to). A one-head Grouter is written exactly as before per-layer
heads existed (version 2); per-layer heads (``head_layers``) are version 3; head groups
(``head_groups``: fewer heads than source layers) version 4. The network itself is
:mod:`grouter.network`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..artifacts import header, load_weights, save_weights
from ..errors import GrouterError
from ..options import POSITIVE_INT, option
from ..routers import Heads

GROUTER_FORMAT = "grouter-router"
GROUTER_VERSION = 4  # 2: the weights' checksum; 3: per-layer heads; 4: head groups (each written only for them)
PER_LAYER_VERSION = 3
ONE_HEAD_VERSION = 2


@dataclass
class Architecture:
    """The Grouter's trunk, as ``grouter distill`` chooses it (the rest of :class:`GrouterConfig`
    comes from the targets)."""

    d_model: int = option(256, range=POSITIVE_INT, memory=True)
    n_layers: int = option(3, "Transformer blocks", flag="--layers", range=POSITIVE_INT, memory=True)
    n_heads: int = option(4, "attention heads", flag="--heads", range=POSITIVE_INT)
    d_ff: int = option(512, range=POSITIVE_INT, memory=True)
    causal: bool = option(True, "bidirectional attention, as the authors' code: routes see later tokens (a leak)",
                          flag="--bidirectional-leaks-future")
    rope: bool = option(True, "no positional information", flag="--no-rope")


@dataclass
class GrouterConfig:
    vocab_size: int
    n_experts: int
    top_k: int  # the k that route() uses by default (the source model's)
    d_model: int = Architecture.d_model
    n_layers: int = Architecture.n_layers
    n_heads: int = Architecture.n_heads
    d_ff: int = Architecture.d_ff
    causal: bool = Architecture.causal
    rope: bool = Architecture.rope
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    score: str = "softmax"  # gating: softmax over the top-k logits, or "sigmoid"
    scale: float = 1.0  # multiplies the gate weights (the authors used 2.5)
    seed: int = 0
    provenance: dict = field(default_factory=dict)  # source model, layer, fold map, tuning: where it came from
    head_layers: list[int] = field(default_factory=list)  # per-layer heads: the source layer of each (none: one head)
    source_layers: int = 0  # the source model's decoder layers (for mapping target layers to heads by depth)
    head_groups: list[int] = field(default_factory=list)  # head groups: the head of each of head_layers (none: its own)
    # Document starts (docs/method.md#document-starts): the id that ends a document; attention and positions
    # restart after it. None: the context runs across documents, as in Grouters made before the option.
    document_eos: int | None = None

    @property
    def heads(self) -> Heads | None:
        """Where the per-layer heads come from (None: one shared head)."""
        return Heads.of(self.head_layers, self.source_layers, self.head_groups)

    @property
    def n_routing_heads(self) -> int:
        """Routing heads: one per source layer (or group of layers), or 1 (a shared head); not the
        attention heads (``n_heads``)."""
        heads = self.heads
        return len(heads) if heads is not None else 1

    def to_dict(self) -> dict:
        """The config as saved and fingerprinted: one head leaves out the per-layer fields, and a Grouter
        without document starts ``document_eos``, so such a Grouter's config and fingerprint are those it
        had before they existed."""
        d = asdict(self)
        if not self.head_layers:
            del d["head_layers"], d["source_layers"]
        if not self.head_groups:
            del d["head_groups"]
        if self.document_eos is None:
            del d["document_eos"]
        return d

    def validate(self) -> "GrouterConfig":
        if not 1 <= self.top_k <= self.n_experts:
            raise GrouterError(f"top-k {self.top_k} must be between 1 and the number of experts ({self.n_experts})")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise GrouterError(f"Grouter d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.score not in ("softmax", "sigmoid"):
            raise GrouterError(f"unknown gating score {self.score!r}; use softmax or sigmoid")
        if self.document_eos is not None and not 0 <= self.document_eos < self.vocab_size:
            raise GrouterError(f"the end-of-document id {self.document_eos} is outside the Grouter's vocabulary "
                               f"({self.vocab_size})")
        if self.head_layers:  # two or more distinct source layers, in order, within the source; two heads or more
            Heads(tuple(self.head_layers), self.source_layers, tuple(self.head_groups))
        elif self.head_groups:
            raise GrouterError("head groups need the source layers they group (head_layers)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "GrouterConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise GrouterError(f"Grouter config has unknown fields {sorted(unknown)}; written by a newer grouter?")
        return cls(**d).validate()


def fingerprint(cfg: GrouterConfig, state: dict[str, torch.Tensor]) -> str:
    """Hash of a Grouter's config (incl. fold map) and weights: what a routing store is bound to."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_grouter(directory: str | Path, cfg: GrouterConfig, state: dict[str, torch.Tensor],
                 extra: dict | None = None) -> None:
    heads = cfg.heads
    version = ONE_HEAD_VERSION if heads is None else GROUTER_VERSION if heads.groups else PER_LAYER_VERSION
    save_weights(directory, state, {**header(GROUTER_FORMAT, version), "config": cfg.to_dict(),
                                    "fingerprint": fingerprint(cfg, state), **(extra or {})})


def load_grouter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json, tensors)`` of a Grouter directory, checksums verified."""
    return load_weights(directory, GROUTER_FORMAT, (ONE_HEAD_VERSION, PER_LAYER_VERSION, GROUTER_VERSION), "Grouter",
                        "grouter distill, fold or tune")


def check_fingerprint(directory: Path, meta: dict, actual: str) -> None:
    if actual != meta.get("fingerprint"):
        raise GrouterError(f"Grouter in {directory} does not match its recorded fingerprint: its weights or config "
                           "were altered; re-create it with grouter distill, fold or tune")
