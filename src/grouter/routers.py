"""Routing decisions and the routers of the paper's baselines.

A router turns a token's hidden state (and, for hash routing, its id) into a :class:`Routing`:
k expert ids and k gate weights per token. The MoE layer does not care where a routing comes
from, which is what lets a frozen Grouter replace the learned router, or stored routing replace
any router at all (``external``).

Routing is always computed in float32: top-k on bf16 logits ties and flips experts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import GrouterError
from .losses import load_balancing_loss, z_loss

ROUTER_KINDS = ("aux", "zloss", "auxfree", "hash", "random", "stablemoe", "none", "external")


def score_shape(heads: int, n_experts: int) -> tuple[int, ...]:
    """The trailing shape of captured scores, Grouter logits and selection biases: ``(E,)`` for one
    layer (one shared head), ``(H, E)`` for H layers (per-layer heads)."""
    return (n_experts,) if heads == 1 else (heads, n_experts)


def layer_heads(head_layers: list[int] | tuple[int, ...], source_layers: int, target_layers: int) -> list[int]:
    """The head each of ``target_layers`` layers routes by: the one whose source layer is nearest in
    relative depth, ``|(l + 0.5)/T - (s_h + 0.5)/S|``, ties to the shallower head
    (docs/method.md#pre-dispatch-and-the-routing-store). Compared exactly, in integers."""
    if target_layers < 1:
        raise GrouterError(f"a target model needs at least one layer, got {target_layers}")
    T, S = target_layers, source_layers
    return [min(range(len(head_layers)), key=lambda h: (abs((2 * l + 1) * S - (2 * head_layers[h] + 1) * T), h))
            for l in range(T)]


@functools.lru_cache(maxsize=64)
def _cached_layer_heads(head_layers: tuple[int, ...], source_layers: int, target_layers: int) -> tuple[int, ...]:
    return tuple(layer_heads(head_layers, source_layers, target_layers))


@dataclass(frozen=True)
class Heads:
    """Per-layer routing: head ``h`` was distilled from layer ``layers[h]`` of a source model with
    ``source_layers`` decoder layers. A target model maps its layers to heads by relative depth
    (:func:`layer_heads`), so one routing serves targets of any depth.

    Head groups (``groups``, docs/method.md#head-groups): fewer heads than captured layers, each
    distilled from a group of adjacent ones; ``groups[i]`` is the head of ``layers[i]``, and a target
    layer takes the head of the captured layer nearest in relative depth. None: a head per layer.
    """

    layers: tuple[int, ...]
    source_layers: int
    groups: tuple[int, ...] = ()

    def __post_init__(self):
        layers = tuple(int(x) for x in self.layers)
        ordered = list(layers) == sorted(set(layers))
        if len(layers) < 2 or not ordered or not 0 <= layers[0] <= layers[-1] < self.source_layers:
            raise GrouterError(f"per-layer heads need two or more distinct source layers in increasing order, "
                               f"within the source's {self.source_layers} layers; got {list(self.layers)}")
        groups = tuple(int(g) for g in self.groups)
        steps = {b - a for a, b in zip(groups, groups[1:])}
        if groups and (len(groups) != len(layers) or groups[0] != 0 or not steps <= {0, 1} or groups[-1] < 1):
            raise GrouterError(f"head groups must number the {len(layers)} layers' heads 0, 1, ... in order, adjacent "
                               f"layers sharing a head, two heads or more; got {list(self.groups)}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "groups", () if groups == tuple(range(len(layers))) else groups)

    @classmethod
    def of(cls, layers, source_layers: int, groups=()) -> "Heads | None":
        """The heads of ``layers`` (None for one shared head: no or one layer, or one group)."""
        if len(layers or ()) < 2 or (groups and max(groups) == 0):
            return None
        return cls(tuple(layers), int(source_layers), tuple(groups or ()))

    def __len__(self) -> int:
        return self.groups[-1] + 1 if self.groups else len(self.layers)

    @property
    def of_layer(self) -> tuple[int, ...]:
        """The head of each of ``layers``."""
        return self.groups or tuple(range(len(self.layers)))

    @property
    def labels(self) -> list[str]:
        """Each head's source layers, as files and titles name them: ``layer5``, or ``layers4-7``."""
        spans = [[x for x, g in zip(self.layers, self.of_layer) if g == h] for h in range(len(self))]
        return [f"layer{s[0]}" if len(s) == 1 else f"layers{s[0]}-{s[-1]}" for s in spans]

    def for_target(self, n_layers: int) -> tuple[int, ...]:
        """The head of each layer of a target with ``n_layers`` layers (computed once per depth)."""
        nearest = _cached_layer_heads(self.layers, self.source_layers, n_layers)
        return tuple(self.of_layer[i] for i in nearest)


def even_groups(n_layers: int, n_groups: int) -> tuple[int, ...]:
    """``n_groups`` groups of adjacent layers as equal in size as can be: the group of each of
    ``n_layers`` layers (``--head-groups``)."""
    if not 1 <= n_groups <= n_layers:
        raise GrouterError(f"--head-groups {n_groups} must be between 1 (one shared head) and the {n_layers} captured "
                           "layers (a head per layer)")
    return tuple(i * n_groups // n_layers for i in range(n_layers))


def token_shape(heads: Heads | None, k: int) -> tuple[int, ...]:
    """The trailing shape of a token's routing ids and weights: ``(k,)`` for one shared head,
    ``(H, k)`` for per-layer heads."""
    return score_shape(1 if heads is None else len(heads), k)


@dataclass
class Routing:
    """k expert ids and k gate weights per token; any leading shape (``[..., k]``).

    ``order`` (token-slots sorted by expert) and ``counts`` (slots per expert) are what the
    experts need to run grouped. When routing is known ahead of the step they are computed once,
    in the data loader (:meth:`grouped`), instead of once per MoE layer inside the step.

    Per-layer routing (``heads`` set) has one routing per head: ids and weights ``[..., H, k]``,
    ``order`` ``[H, slots]`` and ``counts`` ``[H, E]``; layer ``i`` of a model takes its head's
    (:meth:`for_layer`).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    order: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    heads: Heads | None = None

    def flatten(self) -> "Routing":
        k = self.ids.shape[-1]
        return Routing(self.ids.reshape(-1, k), self.weights.reshape(-1, k), self.order, self.counts)

    def to(self, device) -> "Routing":
        """Move to ``device``, except ``counts``: they stay on the host, where the experts read
        them to size their splits without a device-to-host sync in every layer."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Routing(move(self.ids), move(self.weights), move(self.order), self.counts, self.heads)

    def grouped(self, n_experts: int) -> "Routing":
        """A copy with the expert grouping (permutation and per-expert counts) precomputed, per head."""
        if self.heads is None:
            flat = self.ids.reshape(-1)
            return Routing(self.ids, self.weights, flat.argsort(stable=True), expert_counts(flat, n_experts))
        flat = self.ids.movedim(-2, 0).reshape(len(self.heads), -1)
        counts = expert_counts_per_head(self.ids, n_experts, len(self.heads))
        return Routing(self.ids, self.weights, flat.argsort(dim=1, stable=True), counts, self.heads)

    def for_layer(self, layer: int, n_layers: int) -> "Routing":
        """The routing of layer ``layer`` of a model with ``n_layers`` layers: all of it when there
        is one head, else its head's (:meth:`Heads.for_target`)."""
        if self.heads is None:
            return self
        if self.ids.shape[-2] != len(self.heads):
            raise GrouterError(f"per-layer routing has {self.ids.shape[-2]} heads in its ids but {len(self.heads)} "
                               "heads in its description; it is corrupt")
        h = self.heads.for_target(n_layers)[layer]
        pick = lambda t: None if t is None else t[h]  # noqa: E731
        return Routing(self.ids[..., h, :], self.weights[..., h, :], pick(self.order), pick(self.counts))


def topk_gating(logits: torch.Tensor, k: int, score: str = "softmax", scale: float = 1.0,
                selection_bias: torch.Tensor | None = None) -> Routing:
    """Top-k experts of ``logits`` and their gate weights.

    ``softmax``: softmax over the k selected logits (equal to softmax, top-k, renormalise).
    ``sigmoid``: sigmoid scores of the selected experts normalised by their sum.
    ``scale`` multiplies the weights (the authors used 2.5), so rows then sum to ``scale``.
    ``selection_bias`` is added for choosing the experts only, never to the weights.
    """
    if k > logits.shape[-1]:
        raise GrouterError(f"top-k of {k} asked of {logits.shape[-1]} experts; use k <= number of experts")
    logits = logits.float()
    if selection_bias is None:
        top, ids = logits.topk(k, dim=-1)
    else:
        ids = (logits + selection_bias).topk(k, dim=-1).indices
        top = logits.gather(-1, ids)
    if score == "softmax":
        weights = top.softmax(dim=-1)
    elif score == "sigmoid":
        s = top.sigmoid()
        weights = s / s.sum(dim=-1, keepdim=True)
    else:
        raise GrouterError(f"unknown gating score {score!r}; use 'softmax' or 'sigmoid'")
    return Routing(ids, weights * scale if scale != 1.0 else weights)


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token-slots routed to each expert (the load L_i of the metrics)."""
    return torch.bincount(ids.reshape(-1), minlength=n_experts)


def expert_counts_per_head(ids: torch.Tensor, n_experts: int, n_heads: int) -> torch.Tensor:
    """``[H, E]``: the loads of each head, from ids ``[..., H, k]`` (``[..., k]`` when H = 1)."""
    flat = ids.reshape(-1, n_heads, ids.shape[-1]).transpose(0, 1).reshape(n_heads, -1)
    offsets = torch.arange(n_heads, device=ids.device)[:, None] * n_experts
    return torch.bincount((flat + offsets).reshape(-1), minlength=n_heads * n_experts).view(n_heads, n_experts)


class LearnedRouter(nn.Module):
    """Linear softmax router (``aux``: + load-balancing loss; ``zloss``: + z-loss; ``none``: neither)."""

    def __init__(self, d_model: int, n_experts: int, k: int, kind: str = "aux",
                 aux_coef: float = 0.01, z_coef: float = 1e-3):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.n_experts, self.k, self.kind = n_experts, k, kind
        self.aux_coef, self.z_coef = aux_coef, z_coef

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        logits = F.linear(x.float(), self.gate.weight.float())
        routing = topk_gating(logits, self.k)
        loss = logits.new_zeros(())
        if self.kind in ("aux", "zloss"):
            loss = loss + self.aux_coef * load_balancing_loss(logits, routing.ids, self.n_experts)
        if self.kind == "zloss":
            loss = loss + self.z_coef * z_loss(logits)
        return routing, loss


class AuxFreeRouter(nn.Module):
    """Auxiliary-loss-free balancing (DeepSeek-V3): sigmoid scores, a per-expert bias that only
    affects selection, nudged after each step by ``b += gamma * sign(mean(c) - c_i)``."""

    def __init__(self, d_model: int, n_experts: int, k: int, gamma: float = 1e-3):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.register_buffer("bias", torch.zeros(n_experts))
        self.register_buffer("pending_counts", torch.zeros(n_experts), persistent=False)
        self.n_experts, self.k, self.gamma = n_experts, k, gamma

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()
        ids = (scores.detach() + self.bias).topk(self.k, dim=-1).indices
        chosen = scores.gather(-1, ids)
        if self.training:
            self.pending_counts += expert_counts(ids, self.n_experts).float()
        return Routing(ids, chosen / chosen.sum(dim=-1, keepdim=True)), scores.new_zeros(())

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the sign rule with the loads seen since the last update (call after each step)."""
        c = self.pending_counts
        if c.sum() > 0:
            self.bias += self.gamma * torch.sign(c.mean() - c)
        c.zero_()


def balanced_hash_table(token_counts: np.ndarray, n_experts: int, k: int) -> np.ndarray:
    """Token id -> k distinct experts, balancing expected load (Balanced HashLayer).

    Tokens are taken from most to least frequent and each goes to the k experts with the least
    frequency mass so far (greedy longest-processing-time). Runs once per vocabulary.
    """
    counts = np.asarray(token_counts, dtype=np.float64)
    load = np.zeros(n_experts)
    table = np.zeros((len(counts), k), dtype=np.int64)
    for token in np.argsort(-counts, kind="stable"):
        chosen = np.argpartition(load, k - 1)[:k] if k < n_experts else np.arange(n_experts)
        table[token] = chosen
        load[chosen] += counts[token]
    return table


class HashRouter(nn.Module):
    """Experts fixed per token id by a balanced table; gate weights from a learned router."""

    def __init__(self, d_model: int, n_experts: int, k: int, vocab_size: int):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        uniform = np.ones(vocab_size)
        self.register_buffer("table", torch.from_numpy(balanced_hash_table(uniform, n_experts, k)))
        self.n_experts, self.k = n_experts, k

    def set_token_counts(self, token_counts: np.ndarray) -> None:
        table = balanced_hash_table(token_counts, self.n_experts, self.k)
        self.table.copy_(torch.from_numpy(table))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        ids = self.table[token_ids]
        logits = F.linear(x.float(), self.gate.weight.float())
        weights = logits.gather(-1, ids).softmax(dim=-1)
        return Routing(ids, weights), logits.new_zeros(())


class RandomRouter(nn.Module):
    """A frozen random linear router: the control that routing quality, not freezing, matters."""

    def __init__(self, d_model: int, n_experts: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(n_experts, d_model, generator=g) / d_model**0.5)
        self.k = k

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        logits = F.linear(x.float(), self.weight)
        return topk_gating(logits, self.k), logits.new_zeros(())


class StableMoERouter(nn.Module):
    """StableMoE (Dai et al., 2022): stage 1 routes with a learned router trained with the balance
    loss while distilling it into a lightweight router that reads token ids only (an embedding
    table and a linear head); after ``stage1_steps`` optimizer steps the lightweight router is
    frozen and routes alone (stage 2), so routing stops changing. Distillation: KL from the learned
    router's softmax (no gradient) to the lightweight one's, added to the loss in stage 1.
    """

    def __init__(self, d_model: int, n_experts: int, k: int, vocab_size: int, stage1_steps: int, dim: int,
                 aux_coef: float):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, n_experts, bias=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimizer steps so far (checkpointed)
        self.n_experts, self.k, self.stage1_steps, self.aux_coef = n_experts, k, stage1_steps, aux_coef

    @property
    def frozen(self) -> bool:
        return int(self.steps) >= self.stage1_steps

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                return topk_gating(self.head(self.embed(token_ids)), self.k), x.new_zeros((), dtype=torch.float32)
        logits = F.linear(x.float(), self.gate.weight.float())
        routing = topk_gating(logits, self.k)
        distilled = self.head(self.embed(token_ids)).float()
        distill = F.kl_div(distilled.log_softmax(-1), logits.detach().log_softmax(-1), log_target=True,
                           reduction="batchmean")
        return routing, self.aux_coef * load_balancing_loss(logits, routing.ids, self.n_experts) + distill

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1


def build_router(cfg, layer_index: int) -> nn.Module | None:
    """The router module of layer ``layer_index`` of a model with config ``cfg`` (a
    :class:`~grouter.model.MoEConfig`), or None for ``external`` (routing comes with the batch)."""
    kind, d, E, k = cfg.router, cfg.d_model, cfg.n_experts, cfg.top_k
    if kind in ("aux", "zloss", "none"):
        return LearnedRouter(d, E, k, kind, cfg.aux_loss_coef, cfg.z_loss_coef)
    if kind == "auxfree":
        return AuxFreeRouter(d, E, k, cfg.auxfree_gamma)
    if kind == "hash":
        return HashRouter(d, E, k, cfg.vocab_size)
    if kind == "random":
        return RandomRouter(d, E, k, cfg.seed * 1000 + layer_index)
    if kind == "stablemoe":
        return StableMoERouter(d, E, k, cfg.vocab_size, cfg.stablemoe_stage1_steps, cfg.stablemoe_dim,
                               cfg.aux_loss_coef)
    if kind == "external":
        return None
    raise GrouterError(f"unknown router {kind!r}; choose one of {', '.join(ROUTER_KINDS)}")
