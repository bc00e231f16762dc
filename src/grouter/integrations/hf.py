"""Train a Hugging Face transformers MoE causal LM with Grouter routing instead of its own gates.

One Grouter routing (k expert ids and k gate weights per token, :class:`grouter.routers.Routing`)
drives every MoE layer of the model; per-layer routing (a Grouter with per-layer heads, or its
store: ids ``[B, L, H, k]``) drives each decoder layer ``i`` of ``num_hidden_layers`` by the head
nearest in relative depth (:meth:`grouter.routers.Heads.for_target`). The experts, attention,
embeddings, norms and shared experts train as usual, with any PyTorch loop,
``transformers.Trainer`` or accelerate; the gates are not computed and receive no gradient.

::

    from grouter.integrations.hf import use_grouter_routing, GrouterRoutedModel, routing_collator

    # online: the frozen Grouter routes each batch from its input_ids inside model.forward
    handle = use_grouter_routing(model, grouter)
    model(input_ids=x, labels=x).loss.backward()

    # stored: routing supplied per batch (e.g. from a RoutingStore written by `grouter dispatch`)
    handle = use_grouter_routing(model)
    with handle.routing(store.routing("train", idx)):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()

    # Trainer / accelerate: the routing travels in the batch as routing_ids / routing_weights
    wrapped = GrouterRoutedModel(model)                     # or GrouterRoutedModel(model, grouter)
    Trainer(model=wrapped, args=TrainingArguments(..., remove_unused_columns=False),
            train_dataset=ds, data_collator=routing_collator(store, "train")).train()

Patch point (``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``mixtral``, transformers 5.x). Each sparse
MoE block (``*SparseMoeBlock``, at ``model.layers[i].mlp``) calls its router ``block.gate`` with
the flattened hidden states ``[T, H]`` and passes the router's ``(router_logits, top_k_weights,
top_k_index)`` to the fused experts module ``block.experts(hidden, top_k_index, top_k_weights)``.
:func:`use_grouter_routing` replaces ``block.gate`` by a :class:`GrouterGate` that returns the
externally supplied routing in exactly that format; the block's own code and the experts code
(whichever ``experts_implementation`` is configured) run unchanged. So

* the Qwen2-MoE shared expert and its ``shared_expert_gate`` (a sigmoid scalar per token, part
  of the model, not of the routing) are kept and train normally;
* the weights reach the experts exactly as given: the native router's softmax, top-k and
  ``norm_topk_prob`` renormalisation (always on for Mixtral) lived in the replaced module, and
  nothing after it rescales the weights (a Grouter with ``scale=2.5`` keeps rows summing to
  2.5). Their dtype is the one the native router hands over: the hidden dtype for Qwen2-MoE,
  Qwen3-MoE and OLMoE, float32 for Mixtral;
* Mixtral's ``router_jitter_noise`` (a router regulariser that transformers applies to the
  hidden states before both the gate and the experts) is set to 0 on the patched blocks.

Gate parameters. The gate modules hold no parameter: by default the original gate weight is
kept as a frozen, persistent *buffer* named ``weight`` (never used, never trained, never in
``model.parameters()`` nor in any optimizer), so ``state_dict`` keys are unchanged and
``save_pretrained`` writes a complete checkpoint that ``from_pretrained`` loads as an ordinary
HF model (no missing keys, no randomly initialised gates). ``keep_gate_weights=False`` drops them
(their keys are then absent and transformers would initialise the gates randomly on load).
``model.config.grouter_routing`` records that the experts were trained under Grouter routing
(mode, k, Grouter fingerprint); it is saved in config.json. Such a checkpoint, run with its stale
native gates, is NOT the trained model: apply :func:`use_grouter_routing` again after loading to
evaluate or continue training it.

Aux loss / ``router_logits``. The load-balancing loss has nothing to act on (the routing is
fixed, no trainable router exists), so it is disabled: the patched model's
``router_aux_loss_coef`` (an attribute of the ``*ForCausalLM`` instance; the config is left
alone) is set to 0, and ``loss`` is the language-model loss whatever ``output_router_logits`` is.
With ``output_router_logits=True`` each MoE layer still reports ``router_logits`` ``[T, E]``
float32: ``log(w / sum(w))`` at the routed experts and -1e4 elsewhere, so their softmax is the
normalised Grouter routing and ``aux_loss`` is transformers' load-balancing statistic of the
Grouter routing: a gradient-free diagnostic (transformers' formula; lowest at perfect balance).

Stored routing lifetime. :meth:`GrouterRouting.set` routes the *next* forward of the model
only; that forward consumes it, and a later forward without a new ``set`` raises. The routing
in use stays active until the next forward starts, so gradient checkpointing (which re-runs the
MoE blocks during backward) sees the same routing, provided each forward is followed by its
backward before the next forward starts (the usual loop, and Trainer's gradient accumulation);
two checkpointed forwards and then one backward would recompute the first with the second's
routing (an error if the shapes differ, silently wrong if they match).

Limitations: ``generate`` with a KV cache is refused in online mode (the Grouter must see the
whole prefix; use ``use_cache=False``) and in stored mode only its first step has routing; the
Grouter ignores ``attention_mask`` (pad on the right, or pack); one routing per forward, so
``torch.nn.DataParallel`` (threads sharing one model) is not supported (use DDP / accelerate
multi-process); tensor and expert parallel plans of transformers that target ``mlp.gate`` are not
supported; ``torch.compile`` graph-breaks at the forward pre-hook.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import transformers
from torch import nn
from transformers import default_data_collator
from transformers.utils.output_capturing import install_output_capuring_hook

from ..errors import GrouterError
from ..routers import Heads, Routing, token_shape

SUPPORTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")
_SUPPORTED_TEXT = ", ".join(SUPPORTED_MODEL_TYPES)

# Attribute of a patched model holding its GrouterRouting handle (a plain attribute, not a module).
_HANDLE_ATTR = "_grouter_routing"
# router_logits reported for the experts a token is not routed to (finite: survives fp16 casts).
_LOGIT_FLOOR = -1e4


@dataclass(frozen=True)
class _Arch:
    module: str  # transformers.models.<module>.modeling_<module>
    base: str  # the decoder stack (holds embed_tokens and the layers); the forward pre-hook goes here
    block: str  # sparse MoE block: calls block.gate, then block.experts
    router: str  # the gate class replaced
    weights_fp32: bool  # the native router hands float32 weights to the experts (else the hidden dtype)


_ARCHS = {
    "qwen2_moe": _Arch("qwen2_moe", "Qwen2MoeModel", "Qwen2MoeSparseMoeBlock", "Qwen2MoeTopKRouter", False),
    "qwen3_moe": _Arch("qwen3_moe", "Qwen3MoeModel", "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter", False),
    "olmoe": _Arch("olmoe", "OlmoeModel", "OlmoeSparseMoeBlock", "OlmoeTopKRouter", False),
    "mixtral": _Arch("mixtral", "MixtralModel", "MixtralSparseMoeBlock", "MixtralTopKRouter", True),
}


def _arch_classes(model_type: str) -> tuple[_Arch, type, type, type]:
    arch = _ARCHS[model_type]
    try:
        mod = importlib.import_module(f"transformers.models.{arch.module}.modeling_{arch.module}")
        return arch, getattr(mod, arch.base), getattr(mod, arch.block), getattr(mod, arch.router)
    except (ImportError, AttributeError) as e:
        raise GrouterError(
            f"the installed transformers {transformers.__version__} lacks the {model_type} MoE classes grouter patches "
            f"({e}); grouter.integrations.hf supports the fused-experts MoE blocks of transformers 5.x"
        ) from None


# --------------------------------------------------------------------------------------------
# the gate replacement
# --------------------------------------------------------------------------------------------


class GrouterGate(nn.Module):
    """Stands in for a MoE block's router: returns the externally supplied routing.

    ``forward(hidden_states [T, H]) -> (router_logits [T, E] float32, top_k_weights [T, k],
    top_k_index [T, k] long)``, the format of the transformers ``*TopKRouter`` it replaces, with no
    parameter and no compute on ``hidden_states`` (only its token count, device and dtype are
    read). The instances in a model are of a subclass that also derives from the replaced router
    class, so transformers' ``output_router_logits`` recording still finds them.
    """

    def __init__(self, handle: "GrouterRouting", hidden_dim: int, weights_fp32: bool,
                 kept_weight: torch.Tensor | None, layer_index: int = 0):
        nn.Module.__init__(self)  # not the replaced router's __init__: it would create the gate parameter
        self.layer_index = layer_index  # the decoder layer: which head of per-layer routing it takes
        self.top_k = handle.k
        self.num_experts = handle.n_experts
        self.hidden_dim = hidden_dim
        self.weights_fp32 = weights_fp32
        self._grouter_handle = handle
        self._is_hf_initialized = True  # transformers' (re)initialisation must not touch the kept weight
        if kept_weight is not None:
            # The original gate weight, frozen: saved with the model (so the checkpoint loads as an
            # ordinary HF model), never used, never a parameter.
            self.register_buffer("weight", kept_weight.detach(), persistent=True)

    def forward(self, hidden_states: torch.Tensor):
        n_tokens = hidden_states.numel() // self.hidden_dim
        dtype = torch.float32 if self.weights_fp32 else hidden_states.dtype
        return self._grouter_handle._gate_outputs(n_tokens, hidden_states.device, dtype, self.layer_index)

    def extra_repr(self) -> str:
        kept = "kept frozen" if "weight" in self._buffers else "dropped"
        return f"grouter routing, k={self.top_k}, experts={self.num_experts}, original gate weight {kept}"


_GATE_CLASSES: dict[str, type] = {}


def _gate_class(router_cls: type) -> type:
    """``GrouterGate`` subclass that is also an instance of ``router_cls`` (for output recording)."""
    name = f"Grouter{router_cls.__name__}"
    cls = _GATE_CLASSES.get(name)
    if cls is None:
        cls = type(name, (GrouterGate, router_cls), {"__module__": __name__, "__qualname__": name})
        _GATE_CLASSES[name] = cls
    return cls


def __getattr__(name: str):  # PEP 562: lets pickle find the generated gate classes in a new process
    m = re.fullmatch(r"Grouter(\w+TopKRouter)", name)
    if m:
        for model_type, arch in _ARCHS.items():
            if arch.router == m.group(1):
                return _gate_class(_arch_classes(model_type)[3])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# the handle
# --------------------------------------------------------------------------------------------


@dataclass
class _Active:
    """The routing of the forward in progress, flattened to ``[T, k]`` (``[T, H, k]`` per-layer, with
    the head of each decoder layer), with per-device copies."""

    ids: torch.Tensor  # long [T, k] or [T, H, k]
    weights: torch.Tensor  # float32, like ids
    shape: tuple[int, int]
    layer_heads: tuple[int, ...] | None = None
    cache: dict = field(default_factory=dict)


@dataclass
class _Patched:
    name: str
    block: nn.Module
    gate: GrouterGate
    jitter: float | None


class GrouterRouting:
    """Handle returned by :func:`use_grouter_routing`: supplies the routing of a patched model.

    Online mode (a Grouter was given): nothing to do, each forward routes its ``input_ids``.
    Stored mode: call :meth:`set` (or use :meth:`routing`) before every forward.
    """

    def __init__(self, model: nn.Module, model_type: str, base: nn.Module, n_experts: int, k: int,
                 grouter=None, heads: Heads | None = None):
        self.model = model
        self.model_type = model_type
        self.n_experts = n_experts
        self.k = k
        self.grouter = grouter
        self.heads = grouter.cfg.heads if grouter is not None else heads  # per-layer routing (None: one for all)
        self.n_layers = len(base.layers)  # decoder layers: layer i takes the head nearest in relative depth
        self._base = base
        self._blocks: list[_Patched] = []
        self._saved_attrs: list[tuple[nn.Module, str, Any]] = []
        self._pending: Routing | None = None
        self._active: _Active | None = None
        self._hook = None
        self._grouter_device: torch.device | None = None

    # -- public ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"online"`` (routed by the Grouter inside forward) or ``"stored"`` (supplied per batch)."""
        return "online" if self.grouter is not None else "stored"

    @property
    def moe_layers(self) -> list[str]:
        """Module names of the patched MoE blocks."""
        return [p.name for p in self._blocks]

    def set(self, routing: Routing) -> None:
        """Stored routing ``[B, L, k]`` for the next forward (which consumes it); per-layer routing
        ``[B, L, H, k]`` with its ``heads`` (or the handle's, given to :func:`use_grouter_routing`).

        ``ids`` integer expert ids in ``[0, E)``, ``weights`` floating gate weights used as given.
        The shape is checked against the forward's ``input_ids`` when that forward runs.
        """
        if self.grouter is not None:
            raise GrouterError("this model routes online with its Grouter; stored routing is not used "
                               "(patch it with use_grouter_routing(model) without a Grouter to supply routing)")
        if self.model is None:
            raise GrouterError("this GrouterRouting handle was removed; patch the model again")
        ids, weights = getattr(routing, "ids", None), getattr(routing, "weights", None)
        if not (torch.is_tensor(ids) and torch.is_tensor(weights)):
            raise GrouterError(f"routing must be a grouter Routing with tensor ids and weights, got {type(routing).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise GrouterError(f"routing ids must be integer expert ids, got dtype {ids.dtype}")
        if not weights.dtype.is_floating_point:
            raise GrouterError(f"routing weights must be floating point, got dtype {weights.dtype}")
        self._pending = Routing(ids, weights, heads=getattr(routing, "heads", None) or self.heads)

    @contextlib.contextmanager
    def routing(self, routing: Routing) -> Iterator["GrouterRouting"]:
        """``with handle.routing(r): model(...)``; the routing is dropped on exit if no forward used it."""
        self.set(routing)
        try:
            yield self
        finally:
            self._pending = None

    def remove(self) -> None:
        """Undo the patch: native gates back (with the kept weights), hook and attributes restored."""
        if self.model is None:
            return
        if any("weight" not in p.gate._buffers for p in self._blocks):
            raise GrouterError("cannot restore the native gates: they were dropped (keep_gate_weights=False)")
        _, _, _, router_cls = _arch_classes(self.model_type)
        config = self.model.config
        for p in self._blocks:
            kept = p.gate._buffers["weight"]
            with torch.device("meta"):
                router = router_cls(config)
            router.weight = nn.Parameter(kept.detach(), requires_grad=True)
            p.block.gate = router
            if p.jitter is not None:
                p.block.jitter_noise = p.jitter
        for module, attr, value in self._saved_attrs:
            setattr(module, attr, value)
        if self._hook is not None:
            self._hook.remove()
        if hasattr(config, "grouter_routing"):
            delattr(config, "grouter_routing")
        self.model.__dict__.pop(_HANDLE_ATTR, None)
        self.model = self._base = None
        self._blocks, self._pending, self._active = [], None, None

    def __repr__(self) -> str:
        return (f"GrouterRouting({self.model_type}, mode={self.mode}, k={self.k}, experts={self.n_experts}, "
                f"moe_layers={len(self._blocks)})")

    # -- forward machinery ----------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        """Forward pre-hook of the decoder stack: fixes the routing of this forward."""
        self._active = None  # never let a previous batch's routing leak into this one
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args:
            input_ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
                raise GrouterError(f"input_ids must be a [batch, seq] tensor, got "
                                   f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}")
            shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        elif torch.is_tensor(embeds) and embeds.dim() == 3:
            shape = (int(embeds.shape[0]), int(embeds.shape[1]))
        else:
            raise GrouterError("the model was called without input_ids (or [batch, seq, hidden] inputs_embeds)")
        if self.grouter is not None:
            if input_ids is None:
                raise GrouterError("online Grouter routing reads input_ids, but this forward got only inputs_embeds; "
                                   "pass input_ids, or use stored routing")
            past = kwargs.get("past_key_values")
            if past is not None and _cache_length(past) > 0:
                raise GrouterError("online Grouter routing cannot decode incrementally with a KV cache (the Grouter "
                                   "must see the whole prefix); generate with use_cache=False")
            routing = self._route_online(input_ids)
            self._active = self._prepare(routing, shape, trusted=True)
        else:
            routing, self._pending = self._pending, None
            if routing is None:
                raise GrouterError("no routing for this forward: call handle.set(routing) (or pass routing_ids and "
                                   "routing_weights to GrouterRoutedModel) before each forward; a routing is used once")
            self._active = self._prepare(routing, shape, trusted=False)

    @torch.no_grad()
    def _route_online(self, input_ids: torch.Tensor) -> Routing:
        g = self.grouter
        device = input_ids.device
        if self._grouter_device != device:
            g.to(device)
            self._grouter_device = device
        if g.training:
            g.eval()
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= g.cfg.vocab_size:
                raise GrouterError(f"token id {hi if hi >= g.cfg.vocab_size else lo} is outside the Grouter's vocabulary "
                                   f"(0..{g.cfg.vocab_size - 1}); tokenize with the tokenizer the Grouter was distilled with")
        try:
            no_autocast = torch.autocast(device_type=device.type, enabled=False)
        except (RuntimeError, ValueError):  # a device type autocast does not know
            no_autocast = contextlib.nullcontext()
        with no_autocast:  # routing decisions in float32, as `grouter dispatch` makes them
            return g.route(input_ids.long(), self.k)

    def _prepare(self, routing: Routing, shape: tuple[int, int], trusted: bool) -> _Active:
        ids, weights, heads = routing.ids, routing.weights, routing.heads
        want = (*shape, *token_shape(heads, self.k))
        if tuple(ids.shape) != want or tuple(weights.shape) != want:
            layout = "[batch, seq, k]" if heads is None else f"[batch, seq, heads, k] (layers {list(heads.layers)})"
            raise GrouterError(
                f"routing shape mismatch: ids {tuple(ids.shape)}, weights {tuple(weights.shape)}, but input_ids is "
                f"{list(shape)} so the routing must be {layout} = {list(want)}"
            )
        ids = ids.detach().reshape(-1, *want[2:]).long()
        weights = weights.detach().reshape(-1, *want[2:]).float()
        if not trusted and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.n_experts:
                raise GrouterError(f"routing expert id {hi if hi >= self.n_experts else lo} is out of range: the model "
                                   f"has {self.n_experts} experts (ids 0..{self.n_experts - 1})")
            if not bool(torch.isfinite(weights).all()):
                raise GrouterError("routing weights contain NaN or infinity")
        return _Active(ids, weights, shape, None if heads is None else heads.for_target(self.n_layers))

    def _gate_outputs(self, n_tokens: int, device: torch.device, dtype: torch.dtype, layer: int = 0):
        a = self._active
        if a is None:
            raise GrouterError("no routing is active: a patched MoE block ran outside a forward of the patched model "
                               "(call the model or its decoder stack, not a layer, so the routing can be attached)")
        if n_tokens != a.ids.shape[0]:
            raise GrouterError(f"a MoE layer got {n_tokens} tokens but the routing covers {a.ids.shape[0]} "
                               f"(input [batch, seq] = {list(a.shape)})")
        head = None if a.layer_heads is None else a.layer_heads[layer]
        ids, weights = (a.ids, a.weights) if head is None else (a.ids[:, head], a.weights[:, head])
        key = (device, dtype, head)
        out = a.cache.get(key)
        if out is None:
            logits = a.cache.get((device, head))
            if logits is None:
                logits = a.cache[device, head] = _routing_logits(ids, weights, self.n_experts).to(device)
            out = a.cache[key] = (logits, weights.to(device=device, dtype=dtype), ids.to(device))
        return out


def _routing_logits(ids: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``[T, E]`` float32 whose softmax is the normalised routing (reported as ``router_logits``)."""
    w = weights.clamp_min(0)
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    logs = w.clamp_min(1e-30).log().clamp_min(_LOGIT_FLOOR / 2)
    full = torch.full((ids.shape[0], n_experts), _LOGIT_FLOOR, dtype=torch.float32, device=ids.device)
    return full.scatter(1, ids, logs)


def _cache_length(past) -> int:
    try:
        if hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
        if isinstance(past, (tuple, list)) and past and past[0] is not None:
            return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError, RuntimeError):
        pass
    return 0


# --------------------------------------------------------------------------------------------
# patching
# --------------------------------------------------------------------------------------------


def get_grouter_routing(model: nn.Module) -> GrouterRouting | None:
    """The handle of a model patched by :func:`use_grouter_routing`, else None."""
    return getattr(model, "__dict__", {}).get(_HANDLE_ATTR)


def use_grouter_routing(model: nn.Module, grouter=None, k: int | None = None, *,
                        keep_gate_weights: bool = True, heads: Heads | None = None) -> GrouterRouting:
    """Make every MoE layer of a transformers MoE model use Grouter routing; patches ``model`` in place.

    ``grouter`` given: ONLINE mode, each forward routes its ``input_ids`` with the frozen Grouter
    (eval mode, no gradient, float32, moved to the inputs' device; not registered as a submodule,
    so it is neither saved with the model nor seen by optimizers). ``grouter`` None: STORED mode,
    the routing is supplied per forward with the returned handle's ``set`` / ``routing``.

    ``k``: experts per token; defaults to the Grouter's ``top_k`` (online) or the model's
    ``num_experts_per_tok`` (stored); any ``1 <= k <= E`` works. ``heads``: stored per-layer routing
    supplied as bare tensors (``GrouterRoutedModel``'s ``routing_ids [B, L, H, k]``), e.g.
    ``store.heads``; a :class:`~grouter.routers.Routing` carries its own, and a Grouter's are used
    online. ``keep_gate_weights``: keep the original gate weights as frozen, unused buffers so the
    saved checkpoint loads as an ordinary HF model (see the module docstring). Raises :class:`GrouterError` for an unsupported
    ``model_type``, a model without MoE layers, a Grouter with another number of experts or a
    larger vocabulary, a bad ``k``, or a model already patched.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or model_type is None:
        raise GrouterError(f"expected a transformers model (with a config), got {type(model).__name__}")
    if model_type not in _ARCHS:
        raise GrouterError(f"unsupported model_type {model_type!r}: Grouter routing can patch the MoE layers of "
                           f"{_SUPPORTED_TEXT}")
    if get_grouter_routing(model) is not None:
        raise GrouterError("this model already uses Grouter routing; use its handle (get_grouter_routing(model)), "
                           "or call handle.remove() first")
    arch, base_cls, block_cls, router_cls = _arch_classes(model_type)
    blocks, base, n_experts = _moe_blocks(model, model_type, arch, base_cls, block_cls, router_cls)
    k = _check_grouter_and_k(grouter, k, config, n_experts)
    handle = GrouterRouting(model, model_type, base, n_experts, k, grouter, heads)
    if grouter is not None:
        _attach_grouter(handle, grouter, model)
    gate_cls = _gate_class(router_cls)
    layer_of = {id(m): i for i, layer in enumerate(base.layers) for m in layer.modules()}
    for name, block in blocks:
        old = block.gate
        kept = old.weight.detach() if keep_gate_weights else None
        gate = gate_cls(handle, int(old.hidden_dim), arch.weights_fp32, kept, layer_of[id(block)])
        block.gate = gate
        jitter = None
        if hasattr(block, "jitter_noise"):
            jitter, block.jitter_noise = block.jitter_noise, 0.0
        handle._blocks.append(_Patched(name, block, gate, jitter))
        _install_late_recording_hook(gate, base)
    _disable_aux_loss(model, handle, k)
    handle._hook = base.register_forward_pre_hook(handle._pre_hook, with_kwargs=True)
    config.grouter_routing = {
        "note": "experts trained with Grouter routing; the native gate weights are stale: run with "
                "grouter.integrations.hf.use_grouter_routing",
        "mode": handle.mode,
        "k": k,
        "gate_weights": "original (frozen, unused)" if keep_gate_weights else "removed",
        **({"grouter_fingerprint": grouter.fingerprint()} if grouter is not None and hasattr(grouter, "fingerprint") else {}),
        **({} if handle.heads is None else {"head_layers": list(handle.heads.layers),
                                             "layer_heads": list(handle.heads.for_target(handle.n_layers))}),
    }
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def _moe_blocks(model: nn.Module, model_type: str, arch: _Arch, base_cls: type, block_cls: type,
                router_cls: type) -> tuple[list[tuple[str, nn.Module]], nn.Module, int]:
    """The model's MoE blocks (all with the architecture's own gate), its decoder stack and E."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, block_cls)]
    if not blocks:
        raise GrouterError(f"this {model_type} model has no MoE layer to route (no {arch.block}); check num_experts "
                           "and mlp_only_layers in its config")
    for name, block in blocks:
        if isinstance(block.gate, GrouterGate):
            raise GrouterError("this model's gates were already replaced by Grouter routing")
        if not isinstance(block.gate, router_cls):
            raise GrouterError(f"{name}.gate is a {type(block.gate).__name__}, not the {arch.router} grouter knows how "
                               "to replace")
    counts = {int(block.experts.num_experts) for _, block in blocks}
    if len(counts) != 1:
        raise GrouterError(f"the model's MoE layers have different numbers of experts ({sorted(counts)}); one routing "
                           "cannot drive them all")
    bases = [m for m in model.modules() if isinstance(m, base_cls)]
    if len(bases) != 1:
        raise GrouterError(f"expected one {arch.base} decoder stack in the model, found {len(bases)}")
    return blocks, bases[0], counts.pop()


def _check_grouter_and_k(grouter, k: int | None, config, n_experts: int) -> int:
    """The k to route with: given, else the Grouter's top-k (online), else the model's."""
    if grouter is not None:
        gcfg = getattr(grouter, "cfg", None)
        if gcfg is None or not hasattr(grouter, "route"):
            raise GrouterError(f"grouter must be a grouter.network.Grouter, got {type(grouter).__name__}")
        if int(gcfg.n_experts) != n_experts:
            raise GrouterError(f"mismatched expert counts: the Grouter routes to {gcfg.n_experts} experts but the "
                               f"model's MoE layers have {n_experts}; use a Grouter distilled from this model")
        model_vocab = getattr(config, "vocab_size", None)
        if model_vocab is not None and int(gcfg.vocab_size) > int(model_vocab):
            raise GrouterError(f"the Grouter's vocabulary ({gcfg.vocab_size}) is larger than the model's "
                               f"({model_vocab}): it was distilled on another tokenizer's ids")
        if k is None:
            k = int(gcfg.top_k)
    if k is None:
        k = int(config.num_experts_per_tok)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n_experts:
        raise GrouterError(f"k must be an integer between 1 and the number of experts ({n_experts}), got {k!r}")
    return int(k)


def _attach_grouter(handle: "GrouterRouting", grouter, model: nn.Module) -> None:
    """Online mode: the frozen Grouter, on the model's device (unless the model is on meta)."""
    grouter.requires_grad_(False)
    grouter.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if device.type != "meta":
        grouter.to(device)
        handle._grouter_device = device


def _disable_aux_loss(model: nn.Module, handle: "GrouterRouting", k: int) -> None:
    """Fixed routing has nothing to balance (no trainable router): the loss is the LM loss alone.
    The saved attributes are restored by ``handle.remove()``."""
    for m in model.modules():
        for attr, value in (("router_aux_loss_coef", 0.0), ("num_experts_per_tok", k)):
            if hasattr(m, attr) and not isinstance(getattr(m, attr), nn.Module):
                handle._saved_attrs.append((m, attr, getattr(m, attr)))
                setattr(m, attr, value)


def _install_late_recording_hook(gate: nn.Module, base: nn.Module) -> None:
    """If transformers already installed its output-recording hooks (they are installed once, on
    first use), hook the new gate too so ``output_router_logits`` still reports every layer."""
    if not getattr(base, "_output_capturing_hooks_installed", False):
        return
    install_output_capuring_hook(gate, "router_logits", 0)


# --------------------------------------------------------------------------------------------
# Trainer / accelerate
# --------------------------------------------------------------------------------------------


class GrouterRoutedModel(nn.Module):
    """A patched MoE model whose forward takes the routing as batch tensors (for Trainer, accelerate).

    ``forward(input_ids, labels=None, routing_ids=None, routing_weights=None, **kwargs)``: with
    ``routing_ids``/``routing_weights`` ``[B, L, k]`` (stored mode; ``[B, L, H, k]`` for per-layer
    routing, with ``heads=store.heads`` given here) the routing is set for this forward, then the
    inner model runs as usual and its output (loss, logits, ...) is returned.
    In online mode leave them out. ``.model`` is the HF model; attributes the wrapper lacks
    (``config``, ``generate``, ``gradient_checkpointing_enable``, ...) are looked up on it.

    ``save_pretrained`` delegates to the HF model: a complete HF checkpoint (original gate
    weights kept frozen, unless ``keep_gate_weights=False``) plus ``grouter_routing`` in
    config.json. ``Trainer`` itself saves a non-``PreTrainedModel`` as a bare state dict (keys
    prefixed ``model.``), which is what its checkpoint resume reads back; call
    ``wrapped.save_pretrained(dir)`` for a loadable HF model. With ``Trainer`` and
    :func:`routing_collator`, pass ``remove_unused_columns=False`` so the sequence index column
    reaches the collator.
    """

    def __init__(self, model: nn.Module, grouter=None, k: int | None = None, *, keep_gate_weights: bool = True,
                 heads: Heads | None = None):
        super().__init__()
        self.model = model
        handle = get_grouter_routing(model)
        if handle is None:
            handle = use_grouter_routing(model, grouter, k, keep_gate_weights=keep_gate_weights, heads=heads)
        elif grouter is not None or k is not None or heads is not None:
            raise GrouterError("this model already uses Grouter routing; wrap it without grouter/k "
                               "(or call get_grouter_routing(model).remove() first)")
        self.grouter_routing = handle

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                routing_ids: torch.Tensor | None = None, routing_weights: torch.Tensor | None = None, **kwargs):
        if (routing_ids is None) != (routing_weights is None):
            raise GrouterError("pass both routing_ids and routing_weights, or neither")
        if routing_ids is not None:
            self.grouter_routing.set(Routing(routing_ids, routing_weights))
        return self.model(input_ids=input_ids, labels=labels, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """The HF model's ``save_pretrained`` (see the class docstring for what it writes)."""
        return self.model.save_pretrained(save_directory, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or not modules or "model" not in modules:
                raise
            return getattr(modules["model"], name)


class RoutingCollator:
    """Data collator adding the stored routing of each example's sequence (see :func:`routing_collator`)."""

    def __init__(self, store=None, split: str = "train", index_key: str = "index",
                 collate_fn: Callable[[list], dict] | None = None):
        self.store, self.split, self.index_key = store, split, index_key
        self.collate_fn = collate_fn

    def __call__(self, features: list) -> dict:
        collate = self.collate_fn or default_data_collator
        if not features or not all(isinstance(f, dict) for f in features):
            raise GrouterError("routing_collator expects a non-empty list of dict examples")
        if self.store is None:  # online mode: plain collation
            return collate([{k: v for k, v in f.items() if k != self.index_key} for f in features])
        if any(self.index_key not in f for f in features):
            raise GrouterError(f"an example lacks {self.index_key!r} (its sequence index in the routing store's "
                               f"{self.split!r} split); with transformers.Trainer pass remove_unused_columns=False, "
                               "which otherwise drops that column")
        idx = np.asarray([int(f[self.index_key]) for f in features], dtype=np.int64)
        n = self.store.n_sequences(self.split) if hasattr(self.store, "n_sequences") else None
        if n is not None and idx.size and (idx.min() < 0 or idx.max() >= n):
            raise GrouterError(f"sequence index {int(idx.max() if idx.max() >= n else idx.min())} is outside the "
                               f"routing store's {self.split!r} split ({n} sequences)")
        batch = collate([{k: v for k, v in f.items() if k != self.index_key} for f in features])
        routing = self.store.routing(self.split, idx)
        ids, weights = torch.as_tensor(routing.ids), torch.as_tensor(routing.weights)
        tokens = batch.get("input_ids")
        if torch.is_tensor(tokens) and tuple(ids.shape[:2]) != tuple(tokens.shape[:2]):
            raise GrouterError(f"the stored routing is {list(ids.shape)} but input_ids is {list(tokens.shape)}: the "
                               "examples must be the store's sequences, unpadded and uncut")
        batch["routing_ids"] = ids.long()
        batch["routing_weights"] = weights.float()
        return batch


def routing_collator(store=None, split: str = "train", *, index_key: str = "index",
                     collate_fn: Callable[[list], dict] | None = None) -> RoutingCollator:
    """A data collator for :class:`GrouterRoutedModel`: collates the examples (``collate_fn``,
    default ``transformers.default_data_collator``) and adds ``routing_ids`` / ``routing_weights``
    ``[B, L, k]`` (``[B, L, H, k]`` for per-layer routing) read from ``store.routing(split, indices)``
    (a ``grouter.RoutingStore``).

    Each example is a dict with ``input_ids`` (the store's sequence, as ``PackedDataset`` gives
    it: ``seq[:-1]``) and ``index_key``, its sequence index in ``split``; the index is not passed
    on. HF causal LMs shift labels themselves, so give ``labels = input_ids`` (or ``shift_labels =``
    the PackedDataset's ``labels``). ``store=None`` (online mode) collates only. Picklable, so
    DataLoader workers can use it.
    """
    return RoutingCollator(store, split, index_key, collate_fn)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "GrouterGate",
    "GrouterRouting",
    "GrouterRoutedModel",
    "RoutingCollator",
    "get_grouter_routing",
    "routing_collator",
    "use_grouter_routing",
]
