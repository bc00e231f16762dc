"""The built-in decoder-only MoE language model (source and target of the experiments).

Qwen3-MoE-like: RMSNorm, RoPE, causal SDPA attention, MoE feed-forward with SwiGLU experts,
optional always-on shared expert. Every MoE layer takes its routing from a pluggable router
(see :mod:`grouter.routers`) or, with ``router="external"``, from routing supplied with the batch:
one routing for every layer, or per-layer routing (``Routing.heads``), of which layer ``i`` of ``L``
takes the head nearest in relative depth (:meth:`grouter.routers.Routing.for_layer`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GrouterError
from .formats.model import load_model, save_model
from .options import COUNT, POSITIVE_INT, option
from .routers import ROUTER_KINDS, AuxFreeRouter, HashRouter, Routing, StableMoERouter, build_router, expert_counts


@dataclass
class MoEConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_expert: int = 256  # hidden size of one SwiGLU expert
    n_experts: int = 16
    top_k: int = 2
    n_shared_experts: int = 0  # always-on experts of size d_expert, summed into one dense FFN
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    router: str = "aux"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    auxfree_gamma: float = 1e-3
    stablemoe_stage1_steps: int = 0  # StableMoE's learned stage (0: 10 % of the run, set by grouter.train)
    stablemoe_dim: int = 32  # StableMoE's lightweight router: token-embedding size
    init_std: float = 0.02
    seed: int = 0

    def validate(self) -> "MoEConfig":
        if self.router not in ROUTER_KINDS:
            raise GrouterError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTER_KINDS)}")
        if not 1 <= self.top_k <= self.n_experts:
            raise GrouterError(f"top-k {self.top_k} must be between 1 and the number of experts ({self.n_experts})")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise GrouterError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.router == "stablemoe" and not (self.stablemoe_stage1_steps >= 1 and self.stablemoe_dim >= 1):
            raise GrouterError("StableMoE needs stablemoe_stage1_steps >= 1 (grouter train sets 10 % of the run) "
                               "and stablemoe_dim >= 1")
        for name in ("vocab_size", "d_model", "n_layers", "d_expert", "n_experts", "max_seq_len"):
            if getattr(self, name) < 1:
                raise GrouterError(f"model config {name} must be positive, got {getattr(self, name)}")
        return self

    def num_parameters(self) -> int:
        """Parameters of :class:`MoELM` with this config, without building it (a size check must not
        allocate the model it checks)."""
        d, f, E = self.d_model, self.d_expert, self.n_experts
        router = E * d if self.router in ("aux", "zloss", "none", "auxfree", "hash") else 0  # random: a buffer
        if self.router == "stablemoe":
            router = E * d + (self.vocab_size + E) * self.stablemoe_dim
        layer = 4 * d * d + 2 * d + router + E * 3 * d * f + self.n_shared_experts * 3 * d * f
        return 2 * self.vocab_size * d + self.n_layers * layer + d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GrouterError(f"model config has unknown fields {sorted(unknown)}; written by a newer grouter?")
        return cls(**d).validate()


# Named sizes for the command line; each field can still be overridden one by one.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_expert=64, n_experts=8, top_k=2),
    "small": dict(d_model=128, n_layers=4, n_heads=4, d_expert=128, n_experts=16, top_k=2),
    "base": dict(d_model=256, n_layers=6, n_heads=8, d_expert=256, n_experts=32, top_k=4),
}


@dataclass
class ModelOptions:
    """A model size for the command line: a preset, each field of which can be overridden."""

    preset: str = option("small", "model size", choices=tuple(MODEL_PRESETS), memory=True)
    d_model: int | None = option(None, "override the preset's d_model", range=POSITIVE_INT, memory=True)
    n_layers: int | None = option(None, "override the preset's layers", flag="--layers", range=POSITIVE_INT,
                                  memory=True)
    n_heads: int | None = option(None, "override the preset's attention heads", flag="--heads", range=POSITIVE_INT)
    d_expert: int | None = option(None, "override the preset's expert width", range=POSITIVE_INT, memory=True)
    n_experts: int | None = option(None, "override the preset's experts", flag="--experts", range=POSITIVE_INT,
                                   memory=True)
    top_k: int | None = option(None, "override the preset's top-k", range=POSITIVE_INT)
    n_shared_experts: int | None = option(None, "always-on experts", flag="--shared-experts", range=COUNT)

    def sizes(self) -> dict:
        """The preset's sizes with the overrides."""
        given = {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}
        return {**MODEL_PRESETS[self.preset], **given}

    def config(self, vocab_size: int, max_seq_len: int, router: str, seed: int) -> MoEConfig:
        return MoEConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, router=router, seed=seed, **self.sizes())


@dataclass
class MoEOutput:
    logits: torch.Tensor  # [B, L, V]
    loss: torch.Tensor | None  # lm_loss + aux_loss, what the optimiser sees
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # summed over layers, already multiplied by its coefficients
    expert_counts: torch.Tensor  # [n_layers, E] token-slots per expert in this batch
    routing_ids: torch.Tensor  # [n_layers, B, L, k] the experts each layer chose (for consistency metrics)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def register_rope(module: nn.Module, head_dim: int, max_len: int, theta: float) -> None:
    """Attach the RoPE tables as non-persistent buffers (recomputed, never saved)."""
    cos, sin = rope_tables(head_dim, max_len, theta)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention (as Llama/Qwen): x is [B, H, L, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with RoPE (``cos``/``sin`` None: no positions).

    ``causal=False`` lets every token see the whole sequence; only the Grouter's explicitly
    leaking option uses it. ``mask`` (bool ``[B, 1, L, L]``, True: may attend) replaces both, for the
    Grouter's document starts (docs/method.md#document-starts).
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True):
        super().__init__()
        self.n_heads, self.head_dim, self.causal = n_heads, d_model // n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(b, l, d))


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights, computed grouped by expert.

    Token-slots are sorted by expert id so each expert runs one matmul over a contiguous slice;
    the Python loop is over experts, never over tokens. (benchmarks/throughput.py compares this
    with a padded batched-matmul variant.)
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_expert))  # gate | up
        self.w_out = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.n_experts = n_experts

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, d]; routing ids/weights: [T, k]. Returns (y [T, d], counts [E])."""
        k = routing.ids.shape[-1]
        if routing.order is None:
            flat_ids = routing.ids.reshape(-1)
            order, counts = flat_ids.argsort(stable=True), expert_counts(flat_ids, self.n_experts)
        else:  # precomputed by the data loader (routing known ahead of the step)
            order, counts = routing.order, routing.counts
        token_of_slot = order // k
        # index_select, not x[token_of_slot]: the latter's backward adds each token's k slots with
        # atomic adds across CPU threads, so two identical runs would differ in the last bits
        xs = x.index_select(0, token_of_slot)
        outputs = []
        # unbind once: indexing w_in[e] per expert would make autograd build a full-size zero
        # gradient for every expert (E^2 memory traffic); unbind's backward is a single stack.
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        for e, chunk in enumerate(xs.split(counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            gate, up = (chunk @ w_in[e]).chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ w_out[e])
        ys = torch.cat(outputs) * routing.weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys), counts


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_index: int):
        super().__init__()
        self.router = build_router(cfg, layer_index)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_expert)
        self.shared = SwiGLU(cfg.d_model, cfg.n_shared_experts * cfg.d_expert) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, routing: Routing | None):
        b, l, d = x.shape
        flat = x.reshape(-1, d)
        if self.router is None:
            if routing is None:
                raise GrouterError("this model uses external routing: pass routing ids and weights with the batch")
            aux = flat.new_zeros((), dtype=torch.float32)
            routing = routing.flatten()
        else:
            routing, aux = self.router(flat, token_ids.reshape(-1))
        y, counts = self.experts(flat, routing)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(b, l, d), aux, counts, routing.ids.view(b, l, -1)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoELayer(cfg, layer_index)

    def forward(self, x, cos, sin, token_ids, routing):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, aux, counts, ids = self.moe(self.moe_norm(x), token_ids, routing)
        return x + y, aux, counts, ids


class MoELM(nn.Module):
    """Decoder-only MoE language model. ``model(input_ids, labels, routing)`` -> :class:`MoEOutput`."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        register_rope(self, cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * layers)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        residual_std = self.cfg.init_std / (2 * self.cfg.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.ndim == 1:
                continue  # norm weights stay 1
            std = residual_std if name.endswith(("out.weight", "w_out")) else self.cfg.init_std
            p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                routing: Routing | None = None) -> MoEOutput:
        b, l = input_ids.shape
        if l > self.cfg.max_seq_len:
            raise GrouterError(f"sequence length {l} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:l], self.rope_sin[:l]
        x = self.embed(input_ids)
        aux_total = x.new_zeros((), dtype=torch.float32)
        counts, chosen = [], []
        for i, block in enumerate(self.blocks):
            layer_routing = None if routing is None else routing.for_layer(i, self.cfg.n_layers)  # per-layer: its head's
            x, aux, c, ids = block(x, cos, sin, input_ids, layer_routing)
            aux_total = aux_total + aux
            counts.append(c)
            chosen.append(ids)
        logits = self.lm_head(self.norm(x))
        lm_loss = loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))
            loss = lm_loss + aux_total
        return MoEOutput(logits, loss, lm_loss, aux_total, torch.stack(counts).detach(), torch.stack(chosen).detach())

    def routers(self) -> list[nn.Module]:
        return [blk.moe.router for blk in self.blocks if blk.moe.router is not None]

    def after_optimizer_step(self) -> None:
        """Router updates that are not gradients (aux-loss-free bias sign rule, StableMoE's step count)."""
        for r in self.routers():
            if isinstance(r, AuxFreeRouter):
                r.update_bias()
            elif isinstance(r, StableMoERouter):
                r.after_step()

    def set_token_counts(self, token_counts) -> None:
        """Build the balanced hash tables from the training data's token frequencies."""
        for r in self.routers():
            if isinstance(r, HashRouter):
                r.set_token_counts(token_counts)

    def num_parameters(self, active_only: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if active_only:
            per_expert = sum(p[0].numel() for blk in self.blocks for p in blk.moe.experts.parameters())
            total -= per_expert * (self.cfg.n_experts - self.cfg.top_k)
        return total

    # -- persistence: safetensors weights + JSON config, nothing pickled --------------------
    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        save_model(directory, asdict(self.cfg), self.state_dict(), extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> "MoELM":
        directory = Path(directory)
        meta, state = load_model(directory)
        model = cls(MoEConfig.from_dict({**meta["config"], **overrides}))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise GrouterError(f"model weights in {directory} do not match its config ({first}); the checkpoint is corrupt") from None
        return model
