"""Raw router logits of one MoE layer of a Hugging Face model, loading only the prefix that feeds it.

grouter distils a small router from the gate of ONE MoE layer ``L`` of a source model. The gate's
logits depend on nothing after the gate, so :class:`HFRouterPrefix` reads from the safetensors
shards only

* the token embedding,
* every tensor of the decoder layers ``0 .. L-1`` (experts included: they feed layer ``L``),
* from layer ``L``: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and the gate,

and never layer ``L``'s experts (or shared expert) nor any later layer, so peak memory scales with
that prefix and not with the model. Layers ``< L`` are built and loaded by transformers itself
(``from_pretrained`` of the base model with ``num_hidden_layers = L`` and a state dict holding
exactly the prefix tensors), so the checkpoint-to-module weight conversions of the installed
transformers (fused experts in v5, Mixtral's ``block_sparse_moe`` rename) apply unchanged. Layer
``L`` is an instance of the model's own decoder-layer class, built on the meta device so its
experts never take memory, whose MLP is replaced by a probe; it is appended to the base model, so
the model's own forward supplies rotary embeddings and the causal (or sliding-window) masks. The
probe receives the gate's input ``H`` and stops the forward; the logits are ``H @ W^T (+ b)`` in
float32 with the gate weight ``W`` read from disk. The ``router_logits`` outputs of transformers
are never used (some releases return probabilities under that name).

Supported ``model_type``: ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``mixtral``; all of them route by
the softmax of these raw logits. See docs/method.md#capture.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import operator
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import nn

from .artifacts import read_json
from .data import PackedDataset
from .errors import GrouterError
from .model import MODEL_FORMAT
from .network import GROUTER_FORMAT

SUPPORTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")

# Attribute of a decoder layer holding its MoE block (v5 uses ``mlp`` everywhere; Mixtral in v4
# used ``block_sparse_moe``) and the names the gate's tensors may have on disk under that layer.
_MOE_ATTRS = ("mlp", "block_sparse_moe")
_GATE_INPUT_MODULES = ("input_layernorm", "self_attn", "post_attention_layernorm")
_SUPPORTED_TEXT = ", ".join(SUPPORTED_MODEL_TYPES)

# grouter's own checkpoints hold a config.json too; they are never Hugging Face models
GROUTER_FORMATS = (MODEL_FORMAT, GROUTER_FORMAT)


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def is_hf_model_dir(path) -> bool:
    """True when ``path`` is a directory with a Hugging Face ``config.json`` (one naming a
    ``model_type``) that is not a grouter checkpoint. Never raises."""
    try:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            return False
        obj = json.loads(cfg_path.read_text())
    except (OSError, ValueError, TypeError):
        return False
    if not isinstance(obj, dict) or obj.get("format") in GROUTER_FORMATS:
        return False
    return isinstance(obj.get("model_type"), str) and bool(obj["model_type"])


@dataclass
class HFMoEInfo:
    model_type: str
    n_layers: int
    moe_layers: list[int]
    n_experts: int
    top_k: int
    vocab_size: int
    hidden_size: int
    gate_has_bias: bool


def _read_raw_config(path: Path) -> dict:
    if not path.is_dir():
        raise GrouterError(f"Hugging Face model directory not found: {path} is not a directory")
    raw = read_json(path / "config.json", "Hugging Face model config")
    if raw.get("format") in GROUTER_FORMATS:
        raise GrouterError(f"{path} is a grouter checkpoint, not a Hugging Face MoE model; pass the source model's directory")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise GrouterError(f"{path / 'config.json'} has no \"model_type\"; point at a Hugging Face model directory ({_SUPPORTED_TEXT})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GrouterError(
            f"unsupported model_type {model_type!r} in {path / 'config.json'} (no MoE layer grouter can read); "
            f"supported MoE model types: {_SUPPORTED_TEXT}"
        )
    return raw


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration of the block."""
    from transformers.utils import logging as hf_logging  # transformers takes seconds to import: only on load

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_config(path: Path):
    """The transformers config object (defaults filled in exactly as the modeling code sees them)."""
    _read_raw_config(path)
    from transformers import AutoConfig  # transformers takes seconds to import: only on load

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse the user's config.json is theirs to fix
        raise GrouterError(f"invalid Hugging Face config {path / 'config.json'} ({_brief(e)}); fix or re-export config.json") from None


def _n_experts(cfg) -> int:
    for name in ("num_experts", "num_local_experts"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    return 0


def _moe_layers(cfg) -> list[int]:
    n_layers = int(cfg.num_hidden_layers)
    n_experts = _n_experts(cfg)
    if n_experts <= 0:
        return []
    if cfg.model_type in ("qwen2_moe", "qwen3_moe"):
        mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
        step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        return [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]
    return list(range(n_layers))  # olmoe, mixtral: every layer is sparse


def _info_from_config(cfg, path: Path) -> HFMoEInfo:
    moe_layers = _moe_layers(cfg)
    if not moe_layers:
        raise GrouterError(
            f"{path} ({cfg.model_type}) has no MoE layer (num_experts={_n_experts(cfg)}, "
            f"{cfg.num_hidden_layers} layers); use a model with experts ({_SUPPORTED_TEXT})"
        )
    return HFMoEInfo(
        model_type=cfg.model_type,
        n_layers=int(cfg.num_hidden_layers),
        moe_layers=moe_layers,
        n_experts=_n_experts(cfg),
        top_k=int(cfg.num_experts_per_tok),
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        gate_has_bias=False,  # none of the supported architectures has a gate bias; set from the shards on load
    )


def inspect_hf_moe(path) -> HFMoEInfo:
    """Describe the MoE structure of a Hugging Face model directory from its ``config.json`` alone."""
    path = Path(path)
    return _info_from_config(_load_config(path), path)


# --------------------------------------------------------------------------------------------
# safetensors shards
# --------------------------------------------------------------------------------------------


class _Shards:
    """Which file holds each tensor, and reading single tensors by name from only that file."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            obj = read_json(index, "safetensors index")
            weight_map = obj.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise GrouterError(f"safetensors index is corrupt: {index} has no valid \"weight_map\"; re-export the model")
            self.file_of = dict(weight_map)
        elif single.is_file():
            self.file_of = {k: single.name for k in self._keys_of(single)}
        else:
            raise GrouterError(
                f"no safetensors weights in {path} (expected model.safetensors or model.safetensors.index.json); "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        self._handles: dict[str, object] = {}
        self.read: list[str] = []

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise GrouterError(f"weights file {file} is corrupt or truncated ({str(e).splitlines()[0]}); re-download it") from None

    def _handle(self, name: str):
        fname = self.file_of[name]
        if fname not in self._handles:
            file = self.path / fname
            if not file.is_file():
                raise GrouterError(f"weights shard {file} is missing (listed for {name} in the index); re-download the model")
            try:
                self._handles[fname] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise GrouterError(f"weights shard {file} is corrupt or truncated ({str(e).splitlines()[0]}); re-download it") from None
        return self._handles[fname]

    def get(self, name: str, what: str = "required tensor") -> torch.Tensor:
        if name not in self.file_of:
            raise GrouterError(f"{what} {name!r} is missing from the safetensors weights in {self.path}; the checkpoint is incomplete")
        try:
            tensor = self._handle(name).get_tensor(name)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise GrouterError(
                f"{what} {name!r} could not be read from {self.path / self.file_of[name]} ({str(e).splitlines()[0]}); "
                "the checkpoint is incomplete or corrupt"
            ) from None
        self.read.append(name)
        return tensor

    def close(self) -> None:
        self._handles.clear()


def _checkpoint_prefix(names, path: Path) -> str:
    """The prefix before ``embed_tokens.weight`` (``model.`` for *ForCausalLM checkpoints)."""
    hits = sorted((n for n in names if n == "embed_tokens.weight" or n.endswith(".embed_tokens.weight")), key=len)
    if not hits:
        raise GrouterError(f"required tensor 'model.embed_tokens.weight' is missing from the safetensors weights in {path}; the checkpoint is incomplete")
    return hits[0][: -len("embed_tokens.weight")]


# --------------------------------------------------------------------------------------------
# the prefix model
# --------------------------------------------------------------------------------------------


class _GateInput(Exception):
    """Raised by the probe to stop the forward once the gate's input is known."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("gate input captured")
        self.hidden = hidden


class _GateProbe(nn.Module):
    """Stands in for layer L's MoE block: receives exactly what the gate would, then stops."""

    def forward(self, hidden_states, *args, **kwargs):
        raise _GateInput(hidden_states)


def _decoder_layer_class(base) -> type:
    """The decoder-layer class of ``base``: that of its first layer, or (L = 0) the one its model
    class declares unsplittable."""
    if len(base.layers) > 0:
        return type(base.layers[0])
    module = sys.modules[type(base).__module__]
    for name in getattr(base, "_no_split_modules", None) or []:
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise RuntimeError(f"cannot find the decoder layer class of {type(base).__name__}")


def _set_n_layers(cfg, n: int, layer_types) -> None:
    """Give ``cfg`` ``n`` layers, keeping its per-layer attention types (``layer_types``: the full
    model's, or None) in step."""
    cfg.num_hidden_layers = n
    if layer_types is not None:
        cfg.layer_types = list(layer_types[:n])


class HFRouterPrefix:
    """Prefix of a HF MoE model up to the gate of one layer; computes that gate's raw logits.

    Follows :class:`grouter.capture.RouterPrefix`. ``includes_bias`` is True when the checkpoint
    stores a gate bias, which is then added to the logits.
    """

    # Every supported architecture routes by the top-k of softmax(raw gate logits) (transformers'
    # *TopKRouter), so the raw logits are the scores it selects by.
    score_function = "softmax"

    def __init__(self, path, layer: int | None = None, device="cpu", dtype=torch.float32):
        self.path = Path(path)
        self.device = torch.device(device)
        self.dtype = dtype
        full_cfg = _load_config(self.path)
        self.info = _info_from_config(full_cfg, self.path)
        self.layer = _resolve_layer(layer, self.info, self.path)
        self.n_experts = self.info.n_experts
        self.top_k = self.info.top_k

        shards = _Shards(self.path)
        try:
            self._build(full_cfg, shards)
        finally:
            shards.close()
        self.loaded_tensor_names: list[str] = list(shards.read)
        self.vocab_size = int(self._base.embed_tokens.weight.shape[0])
        self.includes_bias = self._gate_b is not None

    # -- construction -------------------------------------------------------------------------

    def _build(self, full_cfg, shards: _Shards) -> None:
        """Layers 0..L-1 loaded by transformers, layer L appended up to its gate, the gate read aside."""
        prefix = _checkpoint_prefix(shards.file_of, self.path)
        base = self._load_base(full_cfg, self._prefix_state_dict(shards, prefix))
        block = self._gate_layer(full_cfg, base, shards, prefix)
        self._load_gate(shards, prefix)
        # The model's own forward now runs layers 0..L (rotary embeddings, causal or sliding-window
        # masks included) and stops at the probe.
        base.layers.append(block)
        _set_n_layers(base.config, self.layer + 1, getattr(full_cfg, "layer_types", None))
        base.to(self.device)
        base.eval()
        base.requires_grad_(False)
        self._base = base

    def _prefix_state_dict(self, shards: _Shards, prefix: str) -> dict[str, torch.Tensor]:
        """The embedding and every tensor of layers < L, exactly as named on disk.

        safetensors returns CPU tensors that map the shard files (no copy), and transformers
        converts them (fusing experts, casting to ``dtype``) into the model, so the prefix's
        parameters are materialised once, in the model.
        """
        L = self.layer
        layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
        layer_of = {name: int(m.group(1)) for name in shards.file_of if (m := layer_re.match(name))}
        absent = sorted(set(range(L)) - set(layer_of.values()))
        if absent:
            raise GrouterError(
                f"required tensors of layer {absent[0]} ('{prefix}layers.{absent[0]}.*') are missing from the "
                f"safetensors weights in {self.path}; the checkpoint is incomplete"
            )
        wanted = [prefix + "embed_tokens.weight"] + [name for name, i in layer_of.items() if i < L]
        _check_experts_complete(wanted, self.n_experts, self.path)
        return {name: shards.get(name) for name in wanted}

    def _load_base(self, full_cfg, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """The base model with layers 0..L-1, built, loaded and converted by transformers itself, so
        its checkpoint-to-module conversions (fused experts, renames) apply unchanged."""
        from transformers import MODEL_MAPPING  # transformers takes seconds to import: only on load

        L = self.layer
        cfg = copy.deepcopy(full_cfg)
        _set_n_layers(cfg, L, getattr(full_cfg, "layer_types", None))
        attn = full_cfg._attn_implementation
        kwargs = {} if attn is None else {"attn_implementation": attn}
        try:
            with _quiet_transformers():
                base, loading = MODEL_MAPPING[type(full_cfg)].from_pretrained(
                    None, config=cfg, state_dict=state_dict, dtype=self.dtype,
                    output_loading_info=True, ignore_mismatched_sizes=True, **kwargs,
                )
        except (RuntimeError, ValueError) as e:  # transformers reports conversion/config failures this way
            raise GrouterError(
                f"could not load layers < {L} of {self.path} ({_brief(e)}); the checkpoint is incomplete or does not match config.json"
            ) from None
        _check_loading(loading, L, self.path)
        return base

    def _gate_layer(self, full_cfg, base, shards: _Shards, prefix: str) -> nn.Module:
        """Layer L: the model's own decoder layer, built on meta so its experts never take memory,
        with its MoE block replaced by the probe; only the modules feeding the gate are loaded."""
        L = self.layer
        layer_cls = _decoder_layer_class(base)
        if full_cfg._attn_implementation is None:
            full_cfg._attn_implementation = base.config._attn_implementation
        with torch.device("meta"):
            block = layer_cls(full_cfg, L)
        moe_attr = next((a for a in _MOE_ATTRS if hasattr(getattr(block, a, None), "gate")), None)
        if moe_attr is None:
            raise GrouterError(f"layer {L} of {self.path} has no MoE gate in {layer_cls.__name__}; MoE layers are {_fmt_layers(self.info.moe_layers)}")
        setattr(block, moe_attr, _GateProbe())
        block.to_empty(device="cpu")
        block.to(self.dtype)
        missing_mods = [m for m in _GATE_INPUT_MODULES if not isinstance(getattr(block, m, None), nn.Module)]
        if missing_mods:
            raise RuntimeError(f"{layer_cls.__name__} lacks {missing_mods}")
        expected = block.state_dict()
        not_stored = [n for n, _ in block.named_buffers() if n not in expected]
        if not_stored:  # to_empty() left them uninitialised; no supported architecture has any
            raise RuntimeError(f"{layer_cls.__name__} has buffers that checkpoints do not store: {not_stored}")
        layer_sd = {}
        for param_name, ref in expected.items():
            disk_name = f"{prefix}layers.{L}.{param_name}"
            layer_sd[param_name] = _check_shape(disk_name, shards.get(disk_name), tuple(ref.shape), self.path)
        block.load_state_dict(layer_sd, strict=True)
        return block

    def _load_gate(self, shards: _Shards, prefix: str) -> None:
        """The gate's weight (and bias, if the checkpoint has one), kept in float32 on the device,
        and the hash of the weight's bytes as stored."""
        w_name, b_name = self._gate_names(shards, prefix, self.layer)
        w = shards.get(w_name, "gate weight")
        self._gate_sha256 = hashlib.sha256(_raw_bytes(w)).hexdigest()
        _check_shape(w_name, w, (self.n_experts, self.info.hidden_size), self.path)
        self._gate_weight_name = w_name
        self._gate_w = w.to(device=self.device, dtype=torch.float32)
        self._gate_b = None
        if b_name is not None:
            b = _check_shape(b_name, shards.get(b_name, "gate bias"), (self.n_experts,), self.path)
            self._gate_b = b.to(device=self.device, dtype=torch.float32)
        self.info.gate_has_bias = self._gate_b is not None

    @staticmethod
    def _gate_names(shards: _Shards, prefix: str, L: int) -> tuple[str, str | None]:
        for attr in _MOE_ATTRS:
            w = f"{prefix}layers.{L}.{attr}.gate.weight"
            if w in shards.file_of:
                b = f"{prefix}layers.{L}.{attr}.gate.bias"
                return w, (b if b in shards.file_of else None)
        raise GrouterError(
            f"gate weight of layer {L} ('{prefix}layers.{L}.mlp.gate.weight' or '.block_sparse_moe.gate.weight') "
            f"is missing from the safetensors weights in {shards.path}; the checkpoint is incomplete"
        )

    # -- use -----------------------------------------------------------------------------------

    @torch.no_grad()
    def router_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Raw gate logits ``[B, T, E]`` (float32) of layer ``self.layer`` for ``input_ids`` ``[B, T]``."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise GrouterError(f"input_ids must be a [batch, seq] integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
        if ids.numel() == 0:
            return torch.zeros(*ids.shape, self.n_experts, dtype=torch.float32, device=self.device)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise GrouterError(
                f"token id {hi if hi >= self.vocab_size else lo} is outside the source model's vocabulary (0..{self.vocab_size - 1}); "
                "tokenize with the source model's tokenizer"
            )
        ids = ids.to(device=self.device, dtype=torch.long)
        try:
            self._base(input_ids=ids, use_cache=False)
        except _GateInput as cap:
            hidden = cap.hidden
        else:  # pragma: no cover - the probe always fires
            raise RuntimeError("the gate probe of layer L was not reached")
        h = hidden.reshape(-1, hidden.shape[-1]).to(torch.float32)
        logits = h @ self._gate_w.T
        if self._gate_b is not None:
            logits = logits + self._gate_b
        return logits.reshape(ids.shape[0], ids.shape[1], self.n_experts)

    def describe(self) -> dict:
        """JSON-able provenance of the captured gate."""
        return {
            "path": str(self.path.resolve()),
            "model_type": self.info.model_type,
            "layer": self.layer,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "hidden_size": self.info.hidden_size,
            "moe_layers": list(self.info.moe_layers),
            "score_function": self.score_function,
            "includes_bias": self.includes_bias,
            "gate_weight_name": self._gate_weight_name,
            "gate_weight_sha256": self._gate_sha256,
        }

    def check_tokenizer(self, data: PackedDataset) -> None:
        """Refuse a dataset tokenized with another vocabulary than the source's ``tokenizer.json``.

        Token ids only mean the same tokens under the same vocabulary. A source directory without a
        ``tokenizer.json`` is not checked here (capture still checks the vocabulary size).
        """
        vocab = load_hf_tokenizer_vocab(self.path)
        if vocab is not None and vocab != data.tokenizer().get_vocab(with_added_tokens=True):
            raise GrouterError(
                f"dataset {data.path} was tokenized with another tokenizer than the source's "
                f"({self.path / 'tokenizer.json'}); re-tokenize the corpus with "
                f"`grouter data tokenize --tokenizer {self.path}`"
            )


def _resolve_layer(layer, info: HFMoEInfo, path: Path) -> int:
    """The MoE layer to capture: ``layer``, checked, or the first MoE layer when None."""
    moe = info.moe_layers
    if layer is None:
        return moe[0]
    try:
        if isinstance(layer, bool):
            raise TypeError
        layer = operator.index(layer)
    except TypeError:
        raise GrouterError(f"layer must be an integer layer index, got {layer!r}; MoE layers are {_fmt_layers(moe)}") from None
    if not 0 <= layer < info.n_layers:
        raise GrouterError(
            f"layer {layer} is out of range: {path} has {info.n_layers} layers (0..{info.n_layers - 1}); "
            f"MoE layers are {_fmt_layers(moe)}"
        )
    if layer not in moe:
        raise GrouterError(f"layer {layer} of {path} is not a MoE layer (it has a dense MLP and no gate); MoE layers are {_fmt_layers(moe)}")
    return layer


def _check_loading(loading: dict, L: int, path: Path) -> None:
    """transformers' loading report of layers < L: every parameter but the final norm (not part of
    the prefix) must have been loaded, at its configured shape."""
    missing = sorted(k for k in loading.get("missing_keys", ()) if k != "norm.weight")
    if missing:
        raise GrouterError(
            f"required tensor(s) for layers < {L} missing from the safetensors weights in {path} "
            f"(model parameters {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); the checkpoint is incomplete"
        )
    mismatched = sorted(loading.get("mismatched_keys", ()), key=str)
    if mismatched:
        key, *shapes = mismatched[0]
        got = f": {tuple(shapes[0])} in the checkpoint, {tuple(shapes[1])} from config.json" if len(shapes) == 2 else ""
        raise GrouterError(f"shape mismatch for {key} in {path}{got}; the config does not match the checkpoint")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], path: Path) -> torch.Tensor:
    """``t``, if it has the shape config.json implies."""
    if tuple(t.shape) != tuple(expected):
        raise GrouterError(
            f"shape mismatch for {name} in {path}: {tuple(t.shape)} on disk, {tuple(expected)} from config.json; "
            "the config does not match the checkpoint"
        )
    return t


def _check_experts_complete(names: list[str], n_experts: int, path: Path) -> None:
    """Per-expert checkpoint tensors must exist for every expert (transformers would fail obscurely)."""
    groups: dict[str, set[int]] = {}
    for name in names:
        m = re.match(r"(.*\.experts\.)(\d+)(\..*)$", name)
        if m:
            groups.setdefault(m.group(1) + "{}" + m.group(3), set()).add(int(m.group(2)))
    for pattern, have in sorted(groups.items()):
        absent = [e for e in range(n_experts) if e not in have]
        if absent:
            raise GrouterError(
                f"required tensor {pattern.format(absent[0])!r} is missing from the safetensors weights in {path} "
                f"({len(absent)} of {n_experts} experts absent); the checkpoint is incomplete"
            )


def _fmt_layers(layers: list[int]) -> str:
    if not layers:
        return "none"
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def _brief(e, limit: int = 240) -> str:
    """An exception's message on one line, shortened."""
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes as stored (little-endian, row-major), for any dtype including bfloat16."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def load_hf_tokenizer_vocab(path) -> dict[str, int] | None:
    """The source model's tokenizer vocabulary (from ``tokenizer.json``), or None if it has none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise GrouterError(f"tokenizer file {file} is corrupt ({_brief(e)}); re-download it") from None
    return dict(tok.get_vocab(with_added_tokens=True))
