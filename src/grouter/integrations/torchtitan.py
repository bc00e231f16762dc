"""Train a torchtitan MoE model (Qwen3-MoE, or any model built from torchtitan's ``MoE``) with Grouter routing.

The routers of every MoE layer are replaced by :class:`GrouterRouter`, which computes nothing and
returns the routing of the batch: stored (a routing store written by ``grouter dispatch``, relabelled
with a placement plan's expert permutation when there is one) or online (a frozen Grouter run on the
batch's tokens). Experts, attention, embeddings and norms train as usual; no router parameter exists,
so nothing of the routing trains or receives a gradient. Written for torchtitan 0.3.0; the router
and the hook also take its main branch's folded batches (router input ``[T, D]``, docs/torchtitan.md#versions).

The recipe::

    from torchtitan.models.qwen3 import model_registry
    from grouter.integrations import torchtitan as gt

    spec = model_registry("30B-A3B", attn_backend="flex")
    gt.turn_off_balancing(spec.model)                     # expert bias, route_norm/scale, groups: off
    spec = gt.grouter_model_spec(spec, routing=STORE)     # routers swapped, config checked against the store
    dataloader = gt.GrouterDataLoader.Config(data=DATA, routing=STORE, plan=PLAN)

and a torchtitan ``Trainer.Config`` with that ``model_spec`` and ``dataloader``
(:mod:`grouter.integrations.torchtitan_trainer`; launch: ``examples/torchtitan_train.py``). Outside the Trainer: build the converted config, then
``routing = attach(model, heads=store.heads)`` and call ``model(tokens, routing_ids=ids,
routing_weights=w)``.

1. **Model config.** :class:`GrouterRouterConverter` (a torchtitan ``ModelConfigConverter``) swaps
   each ``TokenChoiceTopKRouter.Config`` for a :class:`GrouterRouter.Config` with the same fields,
   after checking the model against the routing: the number of experts and top-k equal the store's
   (or the Grouter's); the expert bias (``load_balance_coeff``, torchtitan's only load balancing:
   0.3.0 has no auxiliary loss), ``route_norm``, ``route_scale`` and group-limited routing off,
   since fixed routing has nothing to balance and its weights are final. Anything else is refused
   with a one-line :class:`GrouterError`. :func:`turn_off_balancing` switches them off explicitly.
2. **Routing reaches the routers with the batch.** torchtitan's Trainer passes every key of the
   batch's input dict except ``input`` to ``model(inputs, **extra)``, and ``Decoder.forward``
   takes only ``tokens, positions, attention_masks``. :func:`attach` registers a forward pre-hook
   on the model that takes ``routing_ids`` / ``routing_weights`` out of those keyword arguments
   (online: routes ``tokens`` with the Grouter) and holds them in a :class:`GrouterRouting` that
   every router of the model reads. So the stock Trainer runs unchanged: :func:`grouter_model_spec`
   wraps the model spec's ``parallelize_fn`` to call :func:`attach` once the model is parallelised
   (under pipeline parallelism torchtitan calls it once per stage, and passes the batch's keys to
   every stage).
   Activation checkpointing recomputes a block's forward during its backward, which under a
   pipeline schedule comes after other micro-batches' forwards: each checkpointed block keeps the
   routing of its forwards by input tensor, and the recompute (called with that same tensor) takes
   it back (docs/torchtitan.md#pipeline-parallelism-and-activation-checkpointing).
3. **Data.** :class:`GrouterDataLoader` (a torchtitan ``ParallelAwareDataloader``) reads grouter's
   packed dataset and adds each sequence's stored routing, in exactly the order its sampler serves
   the sequences: a placement plan's order for this data-parallel rank (``PlanSampler``), or
   grouter's seeded epoch shuffle cut into global batches. ``positions`` is each token's index in
   its sequence (packed sequences train with plain causal attention, as in ``grouter train``).
4. **Context parallelism.** The Trainer shards ``input``, ``labels`` and ``positions`` along the
   sequence (``prepare_context_parallel_input``: head-tail, PTRR or no load balancing) but passes
   other keys whole. The sharded ``positions`` name the sequence positions this rank holds, so the
   hook picks exactly those rows of the routing (:func:`shard_like_tokens`): the same sharding as
   the tokens, whichever load balancer, with no mesh to configure.
5. **Per-layer heads.** A store or Grouter with per-layer heads carries ``[B, L, H, k]`` routing;
   :func:`attach` (given the store's ``heads``, or the Grouter) gives the router of decoder layer
   ``i`` of ``model.layers`` the head nearest in relative depth (:meth:`grouter.routers.Heads.for_target`),
   as the built-in model and the Hugging Face integration do.
6. **Expert parallelism.** torchtitan gives EP rank ``r`` the experts ``[r*E/R, (r+1)*E/R)``; the
   plan's permutation (applied by the dataloader) puts each rank's experts there. The all-to-all
   dispatcher sends one copy per (token, expert) pair on another rank: grouter's ``megatron`` cost
   model (benchmarks/torchtitan_bytes.py measures it).

Not supported: tensor parallelism (refused by :func:`grouter_model_spec`); online routing under
context or pipeline parallelism (the Grouter must see whole sequences of tokens) or with a
placement plan (its permutation relabels stored ids): dispatch a store for those.
FlexAttention has no backward on the CPU; :func:`qwen3_moe_config` builds SDPA attention there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset, Sampler
from torch.utils.weak import WeakTensorKeyDictionary
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.moe import MoE, TokenChoiceTopKRouter
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.protocols.module import Module

from ..errors import GrouterError
from ..formats.dataset import DataSplit, PackedDataset
from ..formats.plan import Plan, PlanSampler, relabel
from ..formats.store import RoutingStore
from ..routers import Heads, Routing, token_shape

ROUTING_IDS, ROUTING_WEIGHTS = "routing_ids", "routing_weights"

# Router settings that would re-select experts or rescale the supplied weights: (name, is it on?, fix).
_NOT_FINAL = (
    ("route_norm", lambda r: r.route_norm, "route_norm=False (the Grouter's weights are already normalised)"),
    ("route_scale", lambda r: r.route_scale != 1.0, "route_scale=1.0 (the Grouter's scale is in its weights)"),
    ("group-limited routing", lambda r: r.num_expert_groups is not None or r.num_limited_groups is not None,
     "num_expert_groups=None and num_limited_groups=None"),
    ("forced load balancing", lambda r: r._debug_force_load_balance, "debug.moe_force_load_balance=False"),
)


def _refuse_reselection(where: str, router) -> None:
    for name, is_on, fix in _NOT_FINAL:
        if is_on(router):
            raise GrouterError(f"{where}: {name} would change the supplied routing, which is final; set {fix}")


# -- the router ---------------------------------------------------------------------------------
class GrouterRouter(TokenChoiceTopKRouter):
    """Stands in for ``TokenChoiceTopKRouter``: returns the routing of the micro-batch it runs.

    Same outputs as the original, for either router contract (docs/torchtitan.md#versions):
    torchtitan 0.3.0 passes ``x [B, L, D]`` and gets ``(top_scores [B, L, K] float32, expert_ids
    [B, L, K] long, scores [B, L, E] float32)``; its main branch passes ``x [T, D]`` and gets ``[T, K]``
    and ``[T, E]``. ``scores`` holds the gate weights at the routed experts and 0 elsewhere. No
    parameter and no compute: the gate's config stays in :class:`Config` (torchtitan's sharding code
    annotates it) but is never built.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        """``TokenChoiceTopKRouter.Config``'s fields, so a model config converts field for field."""

    def __init__(self, config: Config):
        Module.__init__(self)  # not TokenChoiceTopKRouter.__init__: it builds the trainable gate
        # Checked again here: Decoder.update_from_config sets _debug_force_load_balance after conversion.
        _refuse_reselection("GrouterRouter", config)
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.routing: GrouterRouting | None = None  # set by attach()
        self.head: int | None = None  # per-layer routing: the head this layer takes (set by attach())
        self.block_routing: Routing | None = None  # in an activation-checkpointed block: set by its pre-hook

    def forward(self, x: torch.Tensor, expert_bias_E: torch.Tensor | None = None):
        if expert_bias_E is not None:
            raise GrouterError("this MoE layer has an expert bias, which would re-select the supplied experts; "
                               "build it with load_balance_coeff=None")
        if self.routing is None:
            raise GrouterError("this GrouterRouter has no routing; call grouter.integrations.torchtitan.attach(model)")
        weights, ids = self.routing.current(x, self)
        scores = torch.zeros(*ids.shape[:-1], self.num_experts, device=ids.device).scatter_(-1, ids, weights)
        return weights, ids, scores

    def take(self) -> Routing:
        """The routing of the micro-batch this layer now runs (docs/torchtitan.md#pipeline-parallelism):
        in an activation-checkpointed block, the one its block's pre-hook found for the block's input
        (the recompute during backward included); elsewhere the one its model chunk's pre-hook set."""
        return self.block_routing if self.block_routing is not None else self.routing.active()

    def extra_repr(self) -> str:
        return f"grouter routing, experts={self.num_experts}, top_k={self.top_k}"


# -- routing of the forward in progress ---------------------------------------------------------
def _local(t):
    """A DTensor's local tensor (the Trainer's full_dtensor backend wraps every batch tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _token_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The token dimensions of a model input: token ids ``[B, L]`` / ``[T]``, or a later pipeline
    stage's hidden states ``[B, L, D]`` / ``[T, D]``."""
    return tuple(t.shape) if not t.dtype.is_floating_point else tuple(t.shape[:-1])


def shard_like_tokens(routing: Routing, positions: torch.Tensor) -> Routing:
    """The routing of the tokens a context-parallel rank holds.

    ``routing`` ``[B, L, k]`` (per-layer: ``[B, L, H, k]``) is the whole sequences'; ``positions``
    ``[B, L']`` the sequence position of each token this rank holds, sharded by torchtitan exactly
    like the tokens.
    """
    idx = positions.long().to(routing.ids.device)
    if idx.ndim == 1:
        idx = idx.expand(routing.ids.shape[0], -1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= routing.ids.shape[1]):
        raise GrouterError(f"positions reach outside the routing's {routing.ids.shape[1]} tokens; under context "
                           "parallelism pass each token's index in its sequence (GrouterDataLoader does)")
    trailing = routing.ids.shape[2:]
    idx = idx.reshape(*idx.shape, *(1,) * len(trailing)).expand(-1, -1, *trailing)
    return Routing(routing.ids.gather(1, idx), routing.weights.gather(1, idx), heads=routing.heads)


class GrouterRouting:
    """The routing of a model's forward, read by all its :class:`GrouterRouter` modules (see :func:`attach`).

    Stored mode: each forward brings its routing, as ``routing_ids`` / ``routing_weights`` keyword
    arguments or through :meth:`set` before it. Online mode (a Grouter was given): each forward is
    routed from its ``tokens``, with no gradient. Routing is ``[B, L, k]`` (torchtitan 0.3.0's
    batches) or ``[T, k]`` (its main branch's folded batches); per-layer routing (``heads`` set) has
    a routing per head, ``[B, L, H, k]`` or ``[T, H, k]``, and each router takes its layer's head.
    """

    def __init__(self, n_experts: int, k: int, grouter=None, heads: Heads | None = None):
        self.n_experts, self.k, self.grouter, self.heads = n_experts, k, grouter, heads
        self.routers: list[GrouterRouter] = []
        self._next: Routing | None = None  # set for the next forward
        self._active: Routing | None = None  # the forward in progress
        self._hooks: list = []
        # each checkpointed block's input -> the routing its forward ran with, for the recompute: under
        # pipeline schedules a stage runs other micro-batches' forwards between a forward and its backward
        self._by_block_input = WeakTensorKeyDictionary()

    @property
    def mode(self) -> str:
        return "online" if self.grouter is not None else "stored"

    def set(self, routing: Routing) -> None:
        """Stored routing ``[B, L, k]`` or ``[T, k]`` (per-layer ``[B, L, H, k]`` / ``[T, H, k]``; ids in
        ``[0, E)``, distinct per token) for the next forward."""
        if self.grouter is not None:
            raise GrouterError("this model routes online with its Grouter; attach it without a Grouter to "
                               "supply stored routing")
        self._next = self._checked(Routing(_local(routing.ids), _local(routing.weights)))

    def active(self) -> Routing:
        """The routing the model chunk's last forward pre-hook set."""
        if self._active is None:
            raise GrouterError("no routing for this forward: call the model (its forward pre-hook sets it), "
                               "not its MoE layers alone")
        return self._active

    def current(self, x: torch.Tensor, router: GrouterRouter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights float32, ids long)`` for a router's input: ``[B, L, k]`` for ``x [B, L, D]``,
        ``[T, k]`` for ``x [T, D]``; per-layer routing: ``router``'s head (None: the active routing)."""
        r = router.take() if router is not None else self.active()
        ids, weights = r.ids, r.weights
        head = router.head if router is not None else None
        if head is not None:
            ids, weights = ids[..., head, :], weights[..., head, :]
        lead = tuple(ids.shape[:-1])
        if x.ndim == 2 and len(lead) == 2:  # [B, L] routing for main's folded [T, D] input
            ids, weights, lead = ids.flatten(0, 1), weights.flatten(0, 1), (lead[0] * lead[1],)
        if lead != tuple(x.shape[:-1]):
            raise GrouterError(f"the routing covers {list(lead)} tokens but this MoE layer sees "
                               f"{list(x.shape[:-1])}; tensor parallelism is not supported, and under context "
                               "parallelism the model needs positions")
        return weights.to(x.device, torch.float32).contiguous(), ids.to(x.device).contiguous()

    def remove(self) -> None:
        """Detach: the hook is removed and the routers have no routing any more."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for r in self.routers:
            r.routing = r.block_routing = None
        self._next = self._active = None

    def _checked(self, routing: Routing) -> Routing:
        ids, w = routing.ids, routing.weights
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or not w.dtype.is_floating_point:
            raise GrouterError(f"routing needs integer ids and floating weights, got {ids.dtype} and {w.dtype}")
        heads = "" if self.heads is None else f"H={len(self.heads)}, "  # per-layer: a routing per head
        per_token = token_shape(self.heads, self.k)
        if ids.ndim - len(per_token) not in (1, 2) or tuple(ids.shape[-len(per_token):]) != per_token \
                or w.shape != ids.shape:
            raise GrouterError(f"routing ids {list(ids.shape)} and weights {list(w.shape)} must both be "
                               f"[batch, seq, {heads}k={self.k}] or [tokens, {heads}k={self.k}] (k: the model's "
                               "top_k); attach with the heads of the store the routing comes from")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_experts):
            raise GrouterError(f"routing ids must lie in [0, {self.n_experts}); a store for another number of "
                               "experts?")
        s = ids.sort(-1).values
        if bool((s[..., 1:] == s[..., :-1]).any()):
            raise GrouterError("a token's routing names the same expert twice; give k distinct experts per token")
        return Routing(ids.long(), w.detach().float(), heads=self.heads)

    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict):
        tokens = _local(args[0] if args else kwargs.get("tokens"))
        ids, weights = kwargs.pop(ROUTING_IDS, None), kwargs.pop(ROUTING_WEIGHTS, None)
        positions = _local(kwargs.get("positions"))
        if self.grouter is not None:
            if ids is not None or weights is not None:
                raise GrouterError("this model routes online with its Grouter but the batch brings stored routing; "
                                   "attach it without a Grouter, or leave routing= out of the dataloader")
            routing = self._route_online(tokens, positions)
        else:
            routing = self._take_stored(ids, weights)
        lead = routing.ids.shape[:routing.ids.ndim - len(token_shape(self.heads, self.k))]
        held = _token_dims(tokens)
        if positions is not None and len(lead) == 2 and len(held) == 2 and lead[1] != held[1]:
            routing = shard_like_tokens(routing, positions)  # context parallelism
        elif len(held) == 1 and held[0] != math.prod(lead):
            why = ("context parallelism over torchtitan's folded [T] batches is not supported (their positions "
                   "restart in every sequence, so they do not name a token's routing row)" if held[0] < math.prod(lead)
                   else "pass the routing of every token of the batch")
            raise GrouterError(f"the routing covers {math.prod(lead)} tokens but the forward holds {held[0]}; {why}")
        self._active = routing.to(tokens.device)
        return args, kwargs

    def _block_pre_hook(self, routers: list[GrouterRouter], block: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before an activation-checkpointed block runs: its forward records the routing for its input
        tensor; the recompute in backward, called with that same tensor, takes it back."""
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        if torch._C._current_graph_task_id() == -1:  # a forward
            routing = self._by_block_input[x] = self.active()
        elif (routing := self._by_block_input.get(x)) is None:
            raise GrouterError("an activation-checkpoint recompute found no routing for its block's input; "
                               "attach the routing after activation checkpointing is applied")
        for r in routers:
            r.block_routing = routing

    def _take_stored(self, ids, weights) -> Routing:
        if (ids is None) != (weights is None):
            raise GrouterError(f"pass both {ROUTING_IDS} and {ROUTING_WEIGHTS}, or neither")
        if ids is not None:
            self.set(Routing(ids, weights))
        if self._next is None:
            raise GrouterError(f"no routing for this forward: pass {ROUTING_IDS}= and {ROUTING_WEIGHTS}= "
                               "(GrouterDataLoader adds them to the batch) or call set() first")
        routing, self._next = self._next, None
        return routing

    def _route_online(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> Routing:
        if tokens is None or tokens.dtype.is_floating_point:
            raise GrouterError("online routing needs the model's token ids; pipeline stages after the first "
                               "see hidden states: use stored routing")
        seqs = tokens if tokens.ndim == 2 else _sequences(tokens, positions)
        if positions is not None and not torch.equal(positions.to(tokens.device).reshape(seqs.shape),
                                                     torch.arange(seqs.shape[1], device=tokens.device)
                                                     .expand_as(seqs)):
            raise GrouterError("online routing needs whole sequences, but these tokens are a context-parallel "
                               "shard; dispatch a routing store (`grouter dispatch`) and use stored routing")
        self.grouter.to(tokens.device)
        with torch.no_grad():
            routing = self.grouter.route(seqs, k=self.k)
        if tokens.ndim == 1:  # main's folded batch: one routing row per token of [T]
            routing = Routing(routing.ids.flatten(0, 1), routing.weights.flatten(0, 1), heads=routing.heads)
        return routing


def _sequences(tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Folded tokens ``[T]`` as ``[B, L]``: ``positions`` restart at 0 with every sequence."""
    starts = [] if positions is None else (positions.reshape(-1) == 0).nonzero().flatten().tolist()
    n = starts[1] if len(starts) > 1 else tokens.numel()
    if not starts or starts[0] != 0 or tokens.numel() % n:
        raise GrouterError("online routing of folded [T] tokens needs positions that restart at 0 with each of "
                           "equally long sequences (GrouterDataLoader's); use stored routing otherwise")
    return tokens.reshape(-1, n)


def attach(model: nn.Module, grouter=None, heads: Heads | None = None, n_layers: int | None = None) -> GrouterRouting:
    """Give the :class:`GrouterRouter` modules of ``model`` their routing; returns the handle.

    Registers a forward pre-hook on ``model`` (see the module docstring). ``grouter``: a
    ``grouter.network.Grouter`` to route online (frozen, eval mode, not a submodule of the model:
    neither saved, sharded nor optimised); None: stored routing comes with each forward, per-layer
    when ``heads`` (the store's ``heads``) is given. With per-layer routing (a Grouter's or a store's
    heads), decoder layer ``i`` of ``model.layers`` takes the head nearest in relative depth among
    ``n_layers`` (default ``len(model.layers)``; a pipeline stage holds only some of the model's layers).
    Call it after activation checkpointing is applied: a checkpointed block keeps the routing of
    each of its forwards for that forward's recompute.
    """
    routers = [m for m in model.modules() if isinstance(m, GrouterRouter)]
    if not routers:
        raise GrouterError("the model has no GrouterRouter; build it from a config converted by "
                           "GrouterRouterConverter (or grouter_model_spec)")
    if any(r.routing is not None for r in routers):
        raise GrouterError("this model's routers are already attached; call remove() on its GrouterRouting first")
    shapes = {(r.num_experts, r.top_k) for r in routers}
    if len(shapes) != 1:
        raise GrouterError(f"the MoE layers disagree on (experts, top_k): {sorted(shapes)}; one routing drives all")
    (n_experts, k), = shapes
    if grouter is not None:
        heads = grouter.cfg.heads
        if int(grouter.cfg.n_experts) != n_experts:
            raise GrouterError(f"the Grouter routes to {grouter.cfg.n_experts} experts but the model has "
                               f"{n_experts}; use a Grouter folded to {n_experts} experts")
        grouter.requires_grad_(False).eval()
    handle = GrouterRouting(n_experts, k, grouter, heads)
    handle.routers = routers
    for r, head in zip(routers, _layer_heads(model, routers, heads, n_layers)):
        r.routing, r.head = handle, head
    handle._hooks.append(model.register_forward_pre_hook(handle._pre_hook, with_kwargs=True))
    for block, inner in _checkpointed_blocks(model, routers).items():
        hook = functools.partial(handle._block_pre_hook, inner)
        handle._hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return handle


def _checkpointed_blocks(model: nn.Module, routers: list[GrouterRouter]) -> dict[nn.Module, list[GrouterRouter]]:
    """The activation-checkpointed blocks of ``model`` (the modules torch's ``checkpoint_wrapper``
    wraps: torchtitan's AC wraps whole decoder layers) and the routers inside each."""
    out: dict[nn.Module, list[GrouterRouter]] = {}
    for wrapper in (m for m in model.modules() if isinstance(m, ActivationWrapper)):
        inner = [r for r in wrapper.modules() if isinstance(r, GrouterRouter)]
        if inner:
            out.setdefault(wrapper._checkpoint_wrapped_module, []).extend(inner)
    return out


def _layer_heads(model: nn.Module, routers: list[GrouterRouter], heads: Heads | None,
                 n_layers: int | None = None) -> list[int | None]:
    """Each router's head: that of its decoder layer (``layers.<i>.`` in its name) among the model's
    ``n_layers`` (default ``len(model.layers)``), by relative depth; None for one-head routing."""
    if heads is None:
        return [None] * len(routers)
    names = {id(m): n for n, m in model.named_modules()}
    found = [re.search(r"(?:^|\.)layers\.(\d+)\.", names[id(r)]) for r in routers]
    if not all(found) or not hasattr(model, "layers"):
        raise GrouterError("per-layer routing maps decoder layers to heads, but these routers are not inside "
                           "model.layers.<i>; attach the whole model")
    return [heads.for_target(n_layers or len(model.layers))[int(m.group(1))] for m in found]


# -- the model config ---------------------------------------------------------------------------
def _routing_shape(routing: str, grouter: str) -> tuple[int, int, str]:
    """``(n_experts, k, what)`` of a routing store or a Grouter directory (exactly one given)."""
    if bool(routing) == bool(grouter):
        raise GrouterError("give exactly one of routing= (a routing store) or grouter= (a Grouter directory)")
    if routing:
        store = RoutingStore.open(routing, verify=False)
        return store.n_experts, store.k, f"routing store {routing}"
    cfg = _load_grouter(grouter).cfg
    return int(cfg.n_experts), int(cfg.top_k), f"Grouter {grouter}"


def check_moe_config(fqn: str, moe: MoE.Config, n_experts: int, k: int, what: str = "the routing") -> None:
    """Refuse a MoE layer config that the routing cannot drive unchanged (see the module docstring)."""
    router = moe.router
    if not isinstance(router, TokenChoiceTopKRouter.Config):
        raise GrouterError(f"{fqn}: its router is a {type(router).__name__}, not a TokenChoiceTopKRouter.Config "
                           "that grouter can replace")
    dispatcher = getattr(moe.routed_experts, "token_dispatcher", None)
    model_k = {router.top_k, getattr(dispatcher, "top_k", router.top_k)}
    if {moe.num_experts, router.num_experts} != {n_experts} or model_k != {k}:
        raise GrouterError(f"{fqn}: the model has {moe.num_experts} experts, top_k {sorted(model_k)}, but {what} "
                           f"has {n_experts} experts, k={k}; build the model with num_experts={n_experts}, "
                           f"top_k={k}")
    if moe.load_balance_coeff is not None:
        raise GrouterError(f"{fqn}: expert-bias load balancing is on (load_balance_coeff={moe.load_balance_coeff}) "
                           "but fixed routing has nothing to balance; set load_balance_coeff=None "
                           "(turn_off_balancing)")
    _refuse_reselection(fqn, router)


class GrouterRouterConverter(ModelConfigConverter):
    """torchtitan model-config converter: every MoE router becomes a :class:`GrouterRouter`.

    Checks each MoE layer against the routing first (:func:`check_moe_config`): the routing store
    (``routing``) or the Grouter (``grouter``) fixes the number of experts and k.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        routing: str = ""
        """Routing store directory (``grouter dispatch``); for stored routing."""

        grouter: str = ""
        """Grouter directory (``grouter distill / fold / tune``); for online routing."""

    def __init__(self, config: Config):
        self.n_experts, self.k, self.what = _routing_shape(config.routing, config.grouter)

    def convert(self, model_config):
        moes = list(model_config.traverse(MoE.Config))
        if not moes:
            raise GrouterError("the model config has no MoE layer (torchtitan MoE.Config) for Grouter routing")
        for fqn, moe, _, _ in moes:
            check_moe_config(fqn, moe, self.n_experts, self.k, self.what)
            old = moe.router
            moe.router = GrouterRouter.Config(**{f.name: getattr(old, f.name) for f in dataclasses.fields(old)})
        return model_config


def turn_off_balancing(model_config):
    """Switch off, in every MoE layer, what fixed routing makes meaningless or would change: the
    expert bias (``load_balance_coeff``), ``route_norm``, ``route_scale`` and group-limited routing."""
    for _, moe, _, _ in model_config.traverse(MoE.Config):
        moe.load_balance_coeff = None
        moe.router.route_norm, moe.router.route_scale = False, 1.0
        moe.router.num_expert_groups = moe.router.num_limited_groups = None
    return model_config


def grouter_model_spec(spec: ModelSpec, routing: str = "", grouter: str = "") -> ModelSpec:
    """``spec`` with Grouter routing, for torchtitan's Trainer: the model config converted
    (:class:`GrouterRouterConverter`), and ``parallelize_fn`` followed by :func:`attach` (with the
    Grouter loaded from ``grouter`` for online routing). Under pipeline parallelism torchtitan calls
    ``parallelize_fn`` once per model chunk, so every stage gets its own routing handle."""
    config = GrouterRouterConverter.Config(routing=routing, grouter=grouter)
    model_config = config.build().convert(spec.model)
    inner, n_layers = spec.parallelize_fn, len(model_config.layers)

    def parallelize(model, *, parallel_dims, **kwargs):
        if parallel_dims.tp_enabled:
            raise GrouterError("tensor parallelism is not supported with Grouter routing (torchtitan's MoE hands "
                               "the router DTensor activations, sequence-sharded under SP, which grouter does not "
                               "shard its routing for); set tensor_parallel_degree 1: FSDP, EP, CP and PP work")
        if parallel_dims.pp_enabled and grouter:
            raise GrouterError("online routing needs token ids, which pipeline stages after the first do not see; "
                               "dispatch a routing store (`grouter dispatch`) and pass routing=")
        model = inner(model, parallel_dims=parallel_dims, **kwargs)
        if grouter:
            attach(model, _load_grouter(grouter))
        else:
            attach(model, heads=RoutingStore.open(routing, verify=False).heads, n_layers=n_layers)
        return model

    return dataclasses.replace(spec, model=model_config, parallelize_fn=parallelize)


def _load_grouter(path: str):
    from ..network import Grouter

    return Grouter.from_pretrained(path)


def qwen3_moe_config(*, vocab_size: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                     moe_hidden_dim: int, n_experts: int, top_k: int, max_seq_len: int, attention: str = "sdpa"):
    """A Qwen3-MoE model config of any size, from torchtitan's own Qwen3 builders, balancing off.

    ``attention``: ``sdpa`` (causal, maskless; the CPU choice: FlexAttention has no backward on the
    CPU), ``flex`` or ``varlen`` (torchtitan's language-model backends; varlen needs CUDA).
    """
    from torchtitan.models import qwen3

    base = qwen3.qwen3_configs["debugmodel_moe"]("flex")  # supplies the Qwen3 inits and norms
    layers = qwen3._build_qwen3_moe_layers(  # torchtitan's (module-private) Qwen3-MoE layer builder
        n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        moe_hidden_dim=moe_hidden_dim, num_experts=n_experts, top_k=top_k, moe_comm_backend="standard",
        attn_backend="flex" if attention == "sdpa" else attention,
        rope=dataclasses.replace(base.layers[0].attention.rope, dim=head_dim, max_seq_len=max_seq_len))
    if attention == "sdpa":
        for layer in layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = dataclasses.replace(
        base, vocab_size=vocab_size, dim=dim, layers=layers, norm=dataclasses.replace(base.norm, normalized_shape=dim),
        tok_embeddings=dataclasses.replace(base.tok_embeddings, num_embeddings=vocab_size, embedding_dim=dim),
        lm_head=dataclasses.replace(base.lm_head, in_features=dim, out_features=vocab_size))
    return turn_off_balancing(config)


# -- data -----------------------------------------------------------------------------------------
class SequenceBatches(Sampler):
    """The sequence indices of each local batch of one data-parallel rank, in training order.

    With a plan: the plan's sequences for this rank, global batch after global batch, each cut into
    local batches (the same order every epoch; a last, smaller global batch is cut to whole local
    batches). Without: grouter's seeded epoch shuffle (``DataSplit.batch_indices``) cut into global
    batches of ``batch_size * world``, this rank's slice of each.
    """

    def __init__(self, split: DataSplit, batch_size: int, rank: int, world: int, seed: int = 0,
                 plan: Plan | None = None, infinite: bool = True):
        self.split, self.batch_size, self.rank, self.world = split, batch_size, rank, world
        self.seed, self.infinite = seed, infinite
        self.groups = PlanSampler(plan, rank, world).batches() if plan is not None else None
        if plan is not None:
            _check_plan_batches(plan, batch_size)
        elif batch_size * world > split.n_sequences:
            raise GrouterError(f"a global batch of {batch_size} x {world} sequences does not fit the {split.name} "
                               f"split's {split.n_sequences}; use a smaller local batch size")

    def _shuffled(self, step: int) -> np.ndarray:
        gb = self.batch_size * self.world
        return self.split.batch_indices(step, gb, self.seed)[self.rank * self.batch_size:][:self.batch_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.groups is None:  # batch_indices runs through the epochs by itself
            per_epoch = self.split.n_sequences // (self.batch_size * self.world)
            yield from map(self._shuffled, itertools.count() if self.infinite else range(per_epoch))
            return
        b = self.batch_size
        while True:
            for g in self.groups:
                yield from (g[a:a + b] for a in range(0, len(g) - b + 1, b))
            if not self.infinite:
                return


def _check_plan_batches(plan: Plan, batch_size: int) -> None:
    """Synchronous data parallelism needs the same share of every global batch on every rank, and
    local batches that tile it (all global batches but a last, smaller one)."""
    if len({tuple(len(b) for b in batches) for batches in plan.samples}) != 1:
        raise GrouterError("the plan gives the data-parallel ranks unequal numbers of sequences (a greedy plan); "
                           "make a balanced one (`grouter place --algorithm balanced`)")
    shares = sorted({len(b) for b in plan.samples[0][:-1]})
    if any(n % batch_size for n in shares):
        raise GrouterError(f"the plan gives each rank {shares} sequences per global batch, which local batch size "
                           f"{batch_size} does not divide; use a divisor (gradient accumulation makes up the rest)")


class RoutedSequences(Dataset):
    """``dataset[idx]`` for an index array: torchtitan's ``(input_dict, labels)`` of those sequences,
    with their stored routing (physical expert ids under ``permutation``) when there is a store."""

    def __init__(self, split: DataSplit, store: RoutingStore | None, permutation: np.ndarray | None):
        self.split, self.store, self.permutation = split, store, permutation

    def __getitem__(self, idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = self.split.batch(idx)
        tokens = batch["input_ids"]
        out = {"input": tokens, "positions": torch.arange(tokens.shape[1]).repeat(tokens.shape[0], 1)}
        if self.store is not None:
            r = self.store.routing(self.split.name, idx)
            ids = r.ids if self.permutation is None else relabel(r.ids, self.permutation)
            out[ROUTING_IDS], out[ROUTING_WEIGHTS] = ids, r.weights
        return out, batch["labels"]


class GrouterDataLoader(ParallelAwareDataloader):
    """torchtitan dataloader over a grouter dataset that adds each sequence's stored routing.

    Each batch: ``({"input", "positions": [B, L] long, "routing_ids": [B, L, k] long,
    "routing_weights": [B, L, k] float32}, labels [B, L])`` (``[B, L, H, k]`` from a store with
    per-layer heads); the sequence order is
    :class:`SequenceBatches`'s. With a plan, the routing's expert ids are relabelled by its
    permutation (``grouter.formats.plan.relabel``), the plan must be for ``dp_world_size`` ranks (EP =
    data parallelism) and the local batch size must divide its per-rank share of a global batch.
    Without a store (online routing) the routing keys are left out.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        data: str = ""
        """grouter dataset directory (``grouter data prepare / tokenize``)."""

        routing: str = ""
        """Routing store of that dataset; empty for online routing (no routing in the batch)."""

        plan: str = ""
        """Placement plan (``grouter place``); empty: seeded shuffle, contiguous experts."""

        split: str = "train"
        seed: int = 0
        infinite: bool = True

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, seq_len: int, local_batch_size: int,
                 snapshot_every_n_steps: int | None = 1, **kwargs):
        if not config.data:
            raise GrouterError("GrouterDataLoader needs data= (a grouter dataset directory)")
        data = PackedDataset.open(config.data)
        if seq_len != data.seq_len:
            raise GrouterError(f"training.seq_len is {seq_len} but the dataset's sequences hold {data.seq_len} "
                               f"tokens; set training.seq_len={data.seq_len}")
        store = RoutingStore.open(config.routing, data=data) if config.routing else None
        plan = _checked_plan(config.plan, store, config.split) if config.plan else None
        split = data.split(config.split)
        self.sequence_batches = SequenceBatches(split, local_batch_size, dp_rank, dp_world_size, config.seed, plan,
                                                config.infinite)
        dataset = RoutedSequences(split, store, plan.permutation if plan is not None else None)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=None,
                         sampler=self.sequence_batches, num_workers=config.num_workers,
                         persistent_workers=config.persistent_workers, pin_memory=config.pin_memory,
                         prefetch_factor=config.prefetch_factor, snapshot_every_n_steps=snapshot_every_n_steps)


def lm_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a :class:`GrouterDataLoader` batch, the model called as torchtitan's
    Trainer calls it: ``model(inputs["input"], **the other keys)`` (for custom loops and tests)."""
    logits = model(inputs["input"], **{k: v for k, v in inputs.items() if k != "input"})
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def _checked_plan(path: str, store: RoutingStore | None, split: str) -> Plan:
    if store is None:
        raise GrouterError("a plan needs stored routing: its expert permutation relabels the store's ids; "
                           "dispatch a routing store (`grouter dispatch`) and pass routing=")
    plan = Plan.load(path)
    if plan.split != split:
        raise GrouterError(f"the plan places the {plan.split!r} split but the dataloader reads {split!r}")
    if (plan.n_experts, plan.k) != (store.n_experts, store.k):
        raise GrouterError(f"the plan is for {plan.n_experts} experts, k={plan.k}, the store has {store.n_experts}, "
                           f"k={store.k}; make the plan from this store (`grouter place --routing`)")
    return plan


__all__ = [
    "ROUTING_IDS",
    "ROUTING_WEIGHTS",
    "GrouterDataLoader",
    "GrouterRouter",
    "GrouterRouterConverter",
    "GrouterRouting",
    "RoutedSequences",
    "SequenceBatches",
    "attach",
    "check_moe_config",
    "grouter_model_spec",
    "lm_loss",
    "qwen3_moe_config",
    "shard_like_tokens",
    "turn_off_balancing",
]
