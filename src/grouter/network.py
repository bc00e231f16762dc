"""The Grouter: a small standalone router that reads token ids and predicts expert logits.

``G(X) = W_s · Enc_N(Emb(X))``: token embedding, N Transformer blocks, bias-free linear head to
E experts (docs/method.md#the-grouter-network). Attention is **causal by default**: the route of token t depends only on
tokens <= t. The authors' code ran the encoder bidirectionally, which lets the routing of token t
see the tokens a causal LM is asked to predict; ``causal=False`` exists only to measure that
leak and is reported as leaking wherever it is used.

Document starts (``document_eos``, ``grouter distill --document-start``): a token's context is its own
document only, from the token after the last end-of-document id, and its position counts from there, as
if the document were routed alone (docs/method.md#document-starts). Every caller gets this from
:meth:`Grouter.encode`, so distill, fold, tune, dispatch and online routing cannot disagree.

Per-layer heads (``head_layers``: the source layers they were distilled from): one trunk and H
bias-free heads, stored as one ``[H·E, d]`` weight; logits, routing and the selection bias then
carry a head axis, ``[..., H, E]`` (``[..., E]`` with one head, as before). A one-head Grouter's
config, weights and fingerprint are exactly those it had before per-layer heads existed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GrouterError
from .formats.grouter import GrouterConfig, check_fingerprint, fingerprint, load_grouter, save_grouter
from .formats.run import finished_checkpoint
from .model import Attention, RMSNorm, SwiGLU, register_rope
from .routers import Routing, score_shape, topk_gating

LEAK_WARNING = ("this Grouter is bidirectional: the route of token t depends on later tokens, which leaks "
                "the future into a causal language model; use it only to measure that leak")


class EncoderBlock(nn.Module):
    def __init__(self, cfg: GrouterConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, causal=cfg.causal)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))


class Grouter(nn.Module):
    """``Grouter(cfg)(input_ids)`` -> float32 logits ``[batch, seq, experts]``, or ``[batch, seq,
    heads, experts]`` with per-layer heads (:meth:`head_logits` always has the head axis)."""

    def __init__(self, cfg: GrouterConfig):
        super().__init__()
        self.cfg = cfg.validate()
        if not cfg.causal:
            warnings.warn(LEAK_WARNING, stacklevel=2)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.score_shape = score_shape(cfg.n_routing_heads, cfg.n_experts)
        self.head = nn.Linear(cfg.d_model, cfg.n_routing_heads * cfg.n_experts, bias=False)  # H heads, stacked
        # Selection-only bias (bias-only tuning): shifts which experts are chosen, never the weights.
        self.register_buffer("selection_bias", torch.zeros(self.score_shape))
        if cfg.rope:
            register_rope(self, cfg.d_model // cfg.n_heads, cfg.max_seq_len, 10000.0)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed)
        for name, p in self.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states before the head, ``[batch, seq, d_model]``."""
        l = input_ids.shape[-1]
        if l > self.cfg.max_seq_len:
            raise GrouterError(f"sequence length {l} exceeds the Grouter's max_seq_len {self.cfg.max_seq_len}")
        positions, mask = self.documents(input_ids) if self.cfg.document_eos is not None else (None, None)
        if not self.cfg.rope:
            cos = sin = None
        elif positions is None:
            cos, sin = self.rope_cos[:l], self.rope_sin[:l]
        else:  # [B, 1, L, D]: each token's angle at its position in its document
            cos, sin = self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm(x)

    def documents(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Document starts: each token's position from its document's first token ``[B, L]``, and the
        attention mask ``[B, 1, L, L]`` that keeps every token within its document (block-diagonal, causal
        unless the Grouter is bidirectional). A document starts at the sequence's first token and after
        every ``document_eos``; the eos itself ends the document before it."""
        t = torch.arange(input_ids.shape[-1], device=input_ids.device)
        starts = F.pad(input_ids[..., :-1] == self.cfg.document_eos, (1, 0), value=True)
        start_of = torch.where(starts, t, 0).cummax(-1).values  # the first token of each token's document
        mask = start_of[..., :, None] == start_of[..., None, :]
        if self.cfg.causal:
            mask &= t[:, None] >= t[None, :]
        return t - start_of, mask.unsqueeze(-3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits_from_hidden(self.encode(input_ids))

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The heads, in float32 (routing decisions are never made in low precision): ``[..., E]`` or
        ``[..., H, E]``."""
        return F.linear(hidden.float(), self.head.weight.float()).unflatten(-1, self.score_shape)

    def head_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits with the head axis, ``[batch, seq, H, E]`` (H = 1 for a shared head)."""
        logits = self(input_ids)
        return logits if self.cfg.heads is not None else logits.unsqueeze(-2)

    def check_data(self, data) -> None:
        """Refuse a dataset tokenized differently from the one this Grouter was distilled on, and, for a
        Grouter with document starts, one whose documents do not end with its end-of-document id."""
        if data.vocab_size != self.cfg.vocab_size:
            raise GrouterError(f"the dataset's vocabulary ({data.vocab_size}) differs from the Grouter's "
                               f"({self.cfg.vocab_size}): it was tokenized with another tokenizer")
        expected = self.cfg.provenance.get("tokenizer_sha256")
        if expected and expected != data.meta.get("tokenizer_sha256"):
            raise GrouterError("the dataset was tokenized with another tokenizer than the Grouter's; "
                               "re-tokenize it with the tokenizer of the source model")
        eos = self.cfg.document_eos
        if eos is not None and (data.eos_id != eos or not data.documents_end_with_eos):
            raise GrouterError(f"this Grouter starts a document after id {eos}, but the documents of dataset "
                               f"{data.path} do not all end with it; remake the data with its documents ending in "
                               "the end-of-document token (preprocess_data.py --append-eod)")

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, k: int | None = None) -> Routing:
        """Top-k experts and gate weights per token (docs/method.md#gating); weights carry no gradient."""
        logits = self(input_ids)
        return self.route_logits(logits, k)

    def route_logits(self, logits: torch.Tensor, k: int | None = None) -> Routing:
        """Top-k of each head's logits: ids and weights ``[..., k]``, or ``[..., H, k]`` with ``heads`` set."""
        bias = self.selection_bias if self.selection_bias.any() else None
        routing = topk_gating(logits, k or self.cfg.top_k, self.cfg.score, self.cfg.scale, bias)
        routing.heads = self.cfg.heads
        return routing

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """Hash of the weights and config (incl. fold map): a routing store is bound to exactly this."""
        return fingerprint(self.cfg, self.state_dict())

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        save_grouter(directory, self.cfg, self.state_dict(), extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Grouter":
        """A Grouter directory (fold, tune), or a finished distillation run (its final checkpoint)."""
        directory = finished_checkpoint(Path(directory), "grouter distill")
        meta, state = load_grouter(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the leak warning is repeated by whoever uses it
            model = cls(GrouterConfig.from_dict(meta["config"]))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise GrouterError(f"Grouter weights in {directory} do not match its config "
                               f"({str(e).strip().splitlines()[-1].strip()}); the file is corrupt") from None
        check_fingerprint(directory, meta, model.fingerprint())
        return model.eval()
