"""Routing scores of MoE layers of a Hugging Face model, loading only the prefix that feeds them.

grouter distils a small router from the gate of one MoE layer ``L`` of a source model (or one head
per layer from the gates of several layers, ``L`` the deepest). The gate's scores depend on
nothing after the gate, so :class:`HFRouterPrefix` reads from the safetensors shards only

* the token embedding,
* every tensor of the decoder layers ``0 .. L-1`` (experts included: they feed layer ``L``),
* from layer ``L``: everything but its MoE block (attention or its linear/state-space mixer, the
  norms), and of the MoE block only the gate and its selection bias,

and never layer ``L``'s experts (or shared experts) nor any later layer, so peak memory scales with
that prefix and not with the model. The prefix is built and loaded by transformers itself
(``from_pretrained`` of the base model with ``num_hidden_layers = L + 1`` and a state dict holding
exactly the prefix tensors), so the checkpoint-to-module conversions of the installed transformers
(fused experts, renamed modules) apply unchanged. In that model layer ``L``'s MoE block is
replaced, while it is still on the meta device, by a probe that keeps only the gate (and the
selection bias); the model's own forward supplies rotary embeddings, masks and hybrid layers, and
the probe receives the gate's input ``H`` and stops the forward; the gate inputs of earlier
captured layers are seen by forward pre-hooks on their (whole) MoE blocks. The scores are computed
from ``H`` in float32 with the gate's tensors read from disk. The ``router_logits`` outputs of
transformers are never used (some releases return probabilities under that name).

**What is recorded** (:data:`ARCHITECTURES` says it per ``model_type``): the scores whose top-k,
with the model's ``k``, are the experts the model's own forward chooses:

* softmax routers: the raw logits ``H @ W^T (+ b)``, ``b`` the gate's own bias (GPT-OSS); softmax
  is monotonic, so top-k before or after it is the same (``score_function = "softmax"``);
* softmax routers that add a selection bias to the probabilities (Ernie-4.5):
  ``softmax(H @ W^T) + c`` (``"softmax"``, ``includes_bias``);
* sigmoid routers: ``sigmoid(H @ W^T)`` (Llama-4), plus the selection bias ``c``
  (``e_score_correction_bias``, DeepSeek-V3 style) where the model has one (``"sigmoid"``,
  ``includes_bias``).

``describe()`` (the ``source`` entry of ``targets.json``) spells the formula out (``scores``).
**Group-limited selection** (DeepSeek-V2/V3 ``n_group``/``topk_group``): the model first keeps the
``topk_group`` best of ``n_group`` expert groups, then takes the top-k inside them. The recorded
scores are those the groups and the top-k are computed from, but their plain top-k may differ from
the model's choice when the group limit drops an expert; such sources are recorded with
``selection = "group_limited_topk"`` and the group parameters, and :func:`group_limited_topk`
applied to the recorded scores reproduces the model's choice. Otherwise ``selection = "topk"``.
A gate bias on disk that the installed transformers' gate does not have (so the model ignores it)
is refused rather than guessed at. Multimodal checkpoints (Llama-4, Qwen3-VL-MoE, Qwen3.5-MoE,
GLM-4.5V, Aria) are read through their language model only. MoE architectures whose router is not a
linear gate on the MoE block's input, or whose choice is not a top-k of such scores, are refused
(:data:`REFUSED_MODEL_TYPES` says why). See docs/method.md#capture.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import nn

from .artifacts import read_json
from .errors import GrouterError
from .formats.dataset import PackedDataset
from .formats.grouter import GROUTER_FORMAT
from .formats.model import MODEL_FORMAT
from .routers import score_shape

# grouter's own checkpoints hold a config.json too; they are never Hugging Face models
GROUTER_FORMATS = (MODEL_FORMAT, GROUTER_FORMAT)


# --------------------------------------------------------------------------------------------
# the architectures
# --------------------------------------------------------------------------------------------

# Which decoder layers are MoE, read from the config exactly as the modeling code decides it.
_MOE_LAYER_RULES: dict[str, Callable[[object, int], bool]] = {
    "every": lambda cfg, i: True,
    "qwen": lambda cfg, i: i not in (cfg.mlp_only_layers or []) and (i + 1) % (cfg.decoder_sparse_step or 1) == 0,
    "mlp_layer_types": lambda cfg, i: cfg.mlp_layer_types[i] == "sparse",
    "first_k_dense_replace": lambda cfg, i: i >= cfg.first_k_dense_replace,
    "num_dense_layers": lambda cfg, i: i >= cfg.num_dense_layers,
    "moe_layers": lambda cfg, i: i in cfg.moe_layers,
    "ernie": lambda cfg, i: (i + 1) % cfg.moe_layer_interval == 0 and cfg.moe_layer_start_index <= i <= cfg.moe_layer_end_index,
    "layers_block_type": lambda cfg, i: cfg.layers_block_type[i] == "moe",
    "layers_num_experts": lambda cfg, i: cfg.layers_num_experts[i] > 1,
}


@dataclass(frozen=True)
class MoEArch:
    """Where one transformers architecture keeps its MoE blocks and gates, and what it routes by."""

    moe_layers: str  # the rule in _MOE_LAYER_RULES saying which decoder layers are MoE
    block: str = "mlp"  # attribute of a decoder layer holding its MoE block
    gate: str = "gate"  # module path, in the block, of the gate: its weight [E, H] (and bias [E], if it has one)
    score: str = "softmax"  # what the router applies to the logits before its top-k: "softmax" or "sigmoid"
    score_field: str | None = None  # or: the config field naming that function
    correction_bias: str | None = None  # tensor path, in the block, of the selection bias added to the scores
    # Group-limited selection, active when n_group > 1 and topk_group < n_group: the model keeps the
    # topk_group best groups, ranked by the sum of their two best scores ("sum_top2", DeepSeek-V3)
    # or by their best score ("max", DeepSeek-V2 with topk_method = "group_limited_greedy"); the
    # experts of the other groups score group_fill (-inf; AXK2: 0) in its top-k.
    groups: str | None = None
    group_fill: float = float("-inf")
    layers: str = "layers"  # attribute of the base model holding the decoder layers
    embedding: str = "embed_tokens"  # attribute of the base model holding the token embedding
    after_layers: tuple[str, ...] = ("norm",)  # base-model modules that run only after the layers: never loaded
    experts_field: str | None = None  # (dotted) config field of the expert count; None: _EXPERT_COUNT_FIELDS
    top_k_field: str = "num_experts_per_tok"  # (dotted) config field of the experts per token
    # A multimodal checkpoint: the prefix of its language model's tensors. The language model
    # (its config's text_config) is the source; text-only input never reaches the vision tower.
    text_model: str | None = None
    # Why only the first MoE layer can be captured, when that is so (the layers before a deeper one
    # would not load correctly); None: any MoE layer can.
    first_moe_layer_only: str | None = None


_V3 = dict(score="sigmoid", correction_bias="gate.e_score_correction_bias", groups="sum_top2")

ARCHITECTURES: dict[str, MoEArch] = {
    "afmoe": MoEArch("num_dense_layers", gate="router.gate", score="sigmoid", correction_bias="expert_bias"),
    "aria": MoEArch("every", gate="router", top_k_field="moe_topk", text_model="language_model.model."),
    "axk1": MoEArch("mlp_layer_types", **_V3),
    "axk2": MoEArch("mlp_layer_types", group_fill=0.0, **_V3),
    "bailing_hybrid": MoEArch("mlp_layer_types", **_V3),
    "beam": MoEArch("mlp_layer_types", **_V3),
    "cohere2_moe": MoEArch("mlp_layer_types", score_field="expert_selection_fn"),
    "deepseek_v2": MoEArch("first_k_dense_replace", groups="max"),
    "deepseek_v3": MoEArch("first_k_dense_replace", **_V3),
    "deepseek_v32": MoEArch("mlp_layer_types", **_V3),
    "dbrx": MoEArch("every", layers="blocks", block="ffn", gate="router.layer", embedding="wte", after_layers=("norm_f",),
                    experts_field="ffn_config.moe_num_experts", top_k_field="ffn_config.moe_top_k"),
    "dots1": MoEArch("first_k_dense_replace", **_V3),
    "ernie4_5_moe": MoEArch("ernie", correction_bias="gate.moe_statics.e_score_correction_bias"),
    "exaone_moe": MoEArch("mlp_layer_types", **_V3),
    "flex_olmo": MoEArch("every"),
    "flint": MoEArch("qwen", score="sigmoid"),
    "glm4_moe": MoEArch("first_k_dense_replace", **_V3),
    "glm4_moe_lite": MoEArch("mlp_layer_types", **_V3),
    "glm4v_moe": MoEArch("first_k_dense_replace", text_model="model.language_model.", **_V3,
                         first_moe_layer_only="transformers has no weight conversion for its language model alone, so "
                                              "an earlier MoE layer's per-expert tensors would not be fused on load"),
    "glm_moe_dsa": MoEArch("mlp_layer_types", **_V3),
    "gpt_oss": MoEArch("every", gate="router"),
    "granitemoe": MoEArch("every", block="block_sparse_moe", gate="router"),
    "granitemoe_swa": MoEArch("every", block="block_sparse_moe", gate="router"),
    "granitemoehybrid": MoEArch("every", block="block_sparse_moe", gate="router"),
    "granitemoeshared": MoEArch("every", block="block_sparse_moe", gate="router"),
    "hunyuan_v1_moe": MoEArch("every", gate="gate.wg"),
    "hy_v3": MoEArch("mlp_layer_types", score="sigmoid", correction_bias="e_score_correction_bias"),
    "hy_v4": MoEArch("mlp_layer_types", after_layers=("hc_head", "norm"), **_V3),
    "jamba": MoEArch("layers_num_experts", block="feed_forward", gate="router", after_layers=("final_layernorm",)),
    "jetmoe": MoEArch("every", gate="router.layer"),  # (its attention experts have routers of their own)
    "kimi_linear": MoEArch("mlp_layer_types", **_V3),
    "lara_mini": MoEArch("every"),
    "lfm2_moe": MoEArch("num_dense_layers", block="feed_forward", score="sigmoid", correction_bias="expert_bias",
                        after_layers=("embedding_norm",)),
    "llama4": MoEArch("moe_layers", block="feed_forward", gate="router", score="sigmoid", text_model="language_model.model."),
    "llama4_text": MoEArch("moe_layers", block="feed_forward", gate="router", score="sigmoid"),
    "mellum": MoEArch("mlp_layer_types"),
    "mimo_v2_flash": MoEArch("mlp_layer_types", **_V3),
    "minimax": MoEArch("every"),
    "minimax_m2": MoEArch("every", score="sigmoid", correction_bias="e_score_correction_bias"),
    "mixtral": MoEArch("every"),
    "nemotron_h": MoEArch("layers_block_type", block="mixer", embedding="embeddings", after_layers=("norm_f",), **_V3),
    "olmoe": MoEArch("every"),
    "phimoe": MoEArch("every", gate="router"),  # sparsemixer: its two experts are the top-2 logits
    "qwen2_moe": MoEArch("qwen"),
    "qwen3_5_moe": MoEArch("every", text_model="model.language_model."),
    "qwen3_5_moe_text": MoEArch("every"),
    "qwen3_moe": MoEArch("qwen"),
    "qwen3_next": MoEArch("qwen"),
    "qwen3_vl_moe": MoEArch("qwen", text_model="model.language_model."),
    "solar_open": MoEArch("every", **_V3),
}

_MULTIMODAL = "a multimodal checkpoint whose language model capture does not read yet (not verified)"
# MoE architectures of the installed transformers that capture refuses, and why.
REFUSED_MODEL_TYPES: dict[str, str] = {
    **{t: _MULTIMODAL for t in (
        "deepseek_ocr2", "dots3_note", "ernie4_5_vl_moe", "glm5_next", "hy_v4_vl",
        "inkling_mm_model", "inkling2", "inkling2_loop", "minimax_m3_vl", "mistral_large4", "muse_spark",
        "qwen3_omni_moe", "qwen4_exp", "step3p7", "unlimited_ocr")},
    "deepseek_v4": "its first layers route by a token-id hash table, not by a gate",
    "diffusion_gemma": "its router normalises and rescales its input before the projection: not a linear gate",
    "gemma4": "its router normalises and rescales its input before the projection: not a linear gate",
    "gemma4_text": "its router normalises and rescales its input before the projection: not a linear gate",
    "doge": "its experts are retrieved by product keys, not chosen by a gate",
    "zaya": "its router is an MLP, not a linear gate",
    "inkling_text": "its gate also scores always-on shared experts that share the routed experts' normalisation",
    "longcat_flash": "it has zero-computation experts and its MoE block is fed between two attention sub-layers",
    "laguna": "its router soft-caps the logits (tanh) before the sigmoid",
    "kolibri1": "it selects by raw logits plus a bias but weights by sigmoid scores",
    "nllb-moe": "an encoder-decoder model; capture reads decoder-only language models",
    "switch_transformers": "an encoder-decoder model; capture reads decoder-only language models",
    "openai_privacy_filter": "a token classifier, not a causal language model",
    "mistral4": "its group-limited selection ranks groups by summed softmax probabilities, which raw logits do not keep",
    "inkling2_text": "not verified: no tiny model of it builds for the tests",
    "inkling2_loop_text": "not verified: no tiny model of it builds for the tests",
}

SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))
_SUPPORTED_TEXT = ", ".join(SUPPORTED_MODEL_TYPES)


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
    score_function: str = "softmax"
    selection: str = "topk"
    groups: tuple[int, int] | None = None  # (n_group, topk_group) of a group-limited selection


def _read_raw_config(path: Path) -> dict:
    if not path.is_dir():
        raise GrouterError(f"Hugging Face model directory not found: {path} is not a directory")
    raw = read_json(path / "config.json", "Hugging Face model config")
    if raw.get("format") in GROUTER_FORMATS:
        raise GrouterError(f"{path} is a grouter checkpoint, not a Hugging Face MoE model; pass the source model's directory")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise GrouterError(f"{path / 'config.json'} has no \"model_type\"; point at a Hugging Face model directory ({_SUPPORTED_TEXT})")
    if model_type not in ARCHITECTURES:
        why = REFUSED_MODEL_TYPES.get(model_type, "no MoE layer grouter can read")
        raise GrouterError(f"unsupported model_type {model_type!r} in {path / 'config.json'} ({why}); "
                           f"supported MoE model types: {_SUPPORTED_TEXT}")
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


def _config_dtype(cfg) -> torch.dtype | None:
    """The dtype the checkpoint's config says its weights have (``dtype``, formerly ``torch_dtype``)."""
    for source in (cfg, getattr(cfg, "text_config", None)):
        value = getattr(source, "dtype", None) or getattr(source, "torch_dtype", None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    return None


_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _n_experts(cfg, arch: MoEArch) -> int:
    for name in (arch.experts_field,) if arch.experts_field else _EXPERT_COUNT_FIELDS:
        value = operator.attrgetter(name)(cfg) if hasattr(cfg, name.split(".")[0]) else None
        if value is not None:
            return int(value)
    return 0


def _moe_layers(cfg, arch: MoEArch) -> list[int]:
    if _n_experts(cfg, arch) <= 0:
        return []
    is_moe = _MOE_LAYER_RULES[arch.moe_layers]
    try:
        return [i for i in range(int(cfg.num_hidden_layers)) if is_moe(cfg, i)]
    except (AttributeError, TypeError, IndexError, KeyError) as e:
        raise GrouterError(f"the {cfg.model_type} config does not say which layers are MoE ({arch.moe_layers} rule: "
                           f"{_brief(e)}); fix or re-export config.json") from None


def _score_function(cfg, arch: MoEArch) -> str:
    score = getattr(cfg, arch.score_field) if arch.score_field else arch.score
    if score not in ("softmax", "sigmoid"):
        raise GrouterError(f"{cfg.model_type} routes by {score!r} scores ({arch.score_field}); grouter reads softmax or sigmoid routers")
    return score


def _groups(cfg, arch: MoEArch) -> tuple[int, int] | None:
    """``(n_group, topk_group)`` when the router limits its choice to the best groups, else None."""
    if arch.groups is None or (arch.groups == "max" and getattr(cfg, "topk_method", None) != "group_limited_greedy"):
        return None
    n_group, topk_group = int(getattr(cfg, "n_group", None) or 1), int(getattr(cfg, "topk_group", None) or 1)
    return (n_group, topk_group) if n_group > 1 and topk_group < n_group else None


def _text_config(full_cfg):
    """The config of the language model: ``full_cfg`` itself, or a multimodal model's ``text_config``."""
    return full_cfg.get_text_config() if ARCHITECTURES[full_cfg.model_type].text_model else full_cfg


def _info_from_config(full_cfg, path: Path) -> HFMoEInfo:
    arch, cfg = ARCHITECTURES[full_cfg.model_type], _text_config(full_cfg)
    moe_layers = _moe_layers(cfg, arch)
    if not moe_layers:
        raise GrouterError(
            f"{path} ({full_cfg.model_type}) has no MoE layer (num_experts={_n_experts(cfg, arch)}, "
            f"{cfg.num_hidden_layers} layers); use a model with experts ({_SUPPORTED_TEXT})"
        )
    groups = _groups(cfg, arch)
    return HFMoEInfo(
        model_type=full_cfg.model_type,
        n_layers=int(cfg.num_hidden_layers),
        moe_layers=moe_layers,
        n_experts=_n_experts(cfg, arch),
        top_k=int(operator.attrgetter(arch.top_k_field)(cfg)),
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.hidden_size),
        gate_has_bias=False,  # set from the shards on load
        score_function=_score_function(cfg, arch),
        selection="topk" if groups is None else "group_limited_topk",
        groups=groups,
    )


def inspect_hf_moe(path) -> HFMoEInfo:
    """Describe the MoE structure of a Hugging Face model directory from its ``config.json`` alone."""
    path = Path(path)
    return _info_from_config(_load_config(path), path)


def group_limited_topk(scores: torch.Tensor, k: int, n_group: int, topk_group: int, group_score: str,
                       group_fill: float = float("-inf")) -> torch.Tensor:
    """The experts ``[..., k]`` a group-limited router (DeepSeek-V2/V3) picks from ``scores`` ``[..., E]``:
    the ``topk_group`` best of ``n_group`` equal groups, ranked by the sum of their two best scores
    (``"sum_top2"``) or their best score (``"max"``), then the top-k of the scores with those of the
    other groups' experts replaced by ``group_fill``. The arguments are in ``describe()``."""
    grouped = scores.reshape(*scores.shape[:-1], n_group, -1)
    rank = grouped.topk(2, dim=-1).values.sum(-1) if group_score == "sum_top2" else grouped.max(-1).values
    keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, rank.topk(topk_group, dim=-1).indices, True)
    masked = grouped.masked_fill(~keep[..., None], group_fill).reshape(scores.shape)
    return masked.topk(k, dim=-1).indices


# --------------------------------------------------------------------------------------------
# safetensors shards
# --------------------------------------------------------------------------------------------


class _Shards:
    """Which file holds each tensor, and reading single tensors by name from only that file."""

    def __init__(self, path: Path, dtype: torch.dtype | None = None):
        self.path = path
        # float tensors must be float32 or the checkpoint's own dtype: a header whose dtype field
        # was altered (same size, other meaning) is caught before its bytes are read as weights
        self.float_dtypes = {torch.float32} | ({dtype} if dtype is not None else set())
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
        self.read: dict[str, None] = {}  # names read, in order (a set with order)

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
        if not tensor.is_floating_point() or tensor.dtype not in self.float_dtypes:
            raise GrouterError(f"{what} {name!r} in {self.path / self.file_of[name]} is {tensor.dtype}, not "
                               f"{' or '.join(sorted(map(str, self.float_dtypes)))} as config.json says: the "
                               "checkpoint is corrupt; re-download it")
        self.read[name] = None
        return tensor

    def close(self) -> None:
        self._handles.clear()


def _checkpoint_prefix(names, layers: str, path: Path) -> str:
    """The prefix before ``<layers>.<i>.`` in the checkpoint's names (``model.`` for *ForCausalLM checkpoints)."""
    hits = {m.group(1) for name in names if (m := re.match(rf"(.*?){re.escape(layers)}\.\d+\.", name))}
    if not hits:
        raise GrouterError(f"no decoder layer ('model.{layers}.0.*') in the safetensors weights in {path}; "
                           "the checkpoint is incomplete")
    return min(hits, key=len)


# --------------------------------------------------------------------------------------------
# the prefix model
# --------------------------------------------------------------------------------------------


class _GateInput(Exception):
    """Raised by the probe to stop the forward once the gate's input is known."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("gate input captured")
        self.hidden = hidden


class _NoGate(Exception):
    """Raised while building the prefix when layer L's block has no gate where the table says."""


class _GateProbe(nn.Module):
    """Stands in for layer L's MoE block: keeps only its gate and selection bias, under their own
    names (so the checkpoint's names for them still apply), receives exactly what the gate would,
    then stops the forward."""

    def __init__(self, block: nn.Module, arch: MoEArch):
        super().__init__()
        for path in filter(None, (arch.gate, arch.correction_bias)):
            name = path.split(".")[0]
            value = getattr(block, name, None)
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            # None: this configuration has no such tensor (e.g. no selection bias)

    def forward(self, hidden_states, *args, **kwargs):
        raise _GateInput(hidden_states)


def _probed_model_class(model_cls: type, arch: MoEArch, L: int) -> type:
    """``model_cls`` whose layer ``L`` gets its MoE block replaced by a probe as soon as it is built
    (inside ``from_pretrained`` that is on the meta device, so the experts never take memory)."""

    def __init__(self, config, *args, **kwargs):
        model_cls.__init__(self, config, *args, **kwargs)
        layer = getattr(self, arch.layers)[L]
        block = getattr(layer, arch.block, None)
        if block is None or _tensor_at(block, f"{arch.gate}.weight") is None:
            raise _NoGate(type(layer).__name__)
        setattr(layer, arch.block, _GateProbe(block, arch))

    namespace = {"__init__": __init__, "__module__": model_cls.__module__, "__qualname__": model_cls.__qualname__}
    return type(model_cls.__name__, (model_cls,), namespace)  # same name: transformers keys weight conversions by it


def _tensor_at(module: nn.Module, path: str) -> torch.Tensor | None:
    """The parameter or buffer at dotted ``path`` under ``module``, or None."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _set_n_layers(cfg, n: int, full_cfg) -> None:
    """Give ``cfg`` ``n`` layers, keeping its per-layer lists (attention and MLP types) in step."""
    cfg.num_hidden_layers = n
    for field in ("layer_types", "mlp_layer_types"):
        types = getattr(full_cfg, field, None)
        if isinstance(types, (list, tuple)) and not isinstance(getattr(type(cfg), field, None), property):
            setattr(cfg, field, list(types[:n]))  # (a property is derived from num_hidden_layers already)


def _checkpoint_targets(model: nn.Module, keys) -> dict[str, str]:
    """The parameter of ``model`` each checkpoint key loads into, by transformers' own renaming."""
    from transformers.conversion_mapping import (get_model_conversion_mapping)  # transformers takes seconds to import: only on load
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    expected, base = model.state_dict(), model.base_model_prefix + "."
    targets = {key: rename_source_key(key, renamings, converters, model.base_model_prefix, expected)[0] for key in keys}
    # transformers strips the base model's prefix only from names it loads; strip it from the rest too
    return {key: t if t in expected else t.removeprefix(base) for key, t in targets.items()}


@dataclass
class _Gate:
    """One captured layer's gate, read from disk in float32: weight, gate bias, selection bias, and
    the names and hash that ``describe()`` records."""

    layer: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    selection: torch.Tensor | None
    names: dict

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias, self.selection) if t is not None]


def process_gpus() -> list[int]:
    """The GPUs of this process: all visible ones, or under torchrun its equal share of its node's
    (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``), so that the processes of a node never share a GPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local, per_node = int(os.environ.get("LOCAL_RANK", "0") or 0), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if count and count < per_node:
        raise GrouterError(f"{per_node} processes per node share {count} GPUs; --device-map needs at least one GPU per "
                           "process")
    share = count // per_node
    return list(range(local * share, (local + 1) * share))


class HFRouterPrefix:
    """Prefix of a HF MoE model up to the gate of its deepest captured layer; computes the scores
    the gates of the captured layers route by.

    Follows :class:`grouter.capture.RouterPrefix`: ``score_function`` is ``"softmax"`` (raw logits,
    or softmax probabilities plus a selection bias) or ``"sigmoid"``; ``includes_bias`` is True
    when a gate bias or a selection bias is part of the scores (see the module docstring).
    ``layer`` (one) or ``layers`` (several, or ``"all"`` MoE layers) say which gates; the layers
    before the deepest run whole, their gate inputs seen by forward pre-hooks on their MoE blocks.
    """

    def __init__(self, path, layer: int | None = None, device="cpu", dtype=torch.float32, *, layers=None,
                 device_map: str | None = None):
        self.path = Path(path)
        self.device_map = device_map
        self.gpus = process_gpus() if device_map == "auto" else []
        # the gates and their scores live on the first device of the process (its first GPU with a device map)
        self.device = torch.device("cuda", self.gpus[0]) if self.gpus else torch.device(device)
        self.dtype = dtype
        full_cfg = _load_config(self.path)
        self.arch = ARCHITECTURES[full_cfg.model_type]
        self.info = _info_from_config(full_cfg, self.path)
        self.layers = resolve_layers(layer, layers, self.info.moe_layers, self.info.n_layers, str(self.path))
        first, reason = self.info.moe_layers[0], self.arch.first_moe_layer_only
        if reason and self.layers != [first]:
            raise GrouterError(f"only the first MoE layer ({first}) of a {full_cfg.model_type} model can be captured: "
                               f"{reason}; pass --layer {first}")
        self.n_layers = self.info.n_layers
        self.n_experts = self.info.n_experts
        self.top_k = self.info.top_k
        self.score_function = self.info.score_function

        shards = _Shards(self.path, _config_dtype(full_cfg))
        try:
            self._build(full_cfg, shards)
        finally:
            shards.close()
        self.loaded_tensor_names: list[str] = list(shards.read)
        self.vocab_size = int(getattr(self._base, self.arch.embedding).weight.shape[0])
        self.includes_bias = any(g.bias is not None or g.selection is not None for g in self._gates)

    @property
    def layer(self) -> int:
        """The captured layer, when one is captured."""
        if len(self.layers) > 1:
            raise GrouterError(f"this prefix captures layers {_fmt_layers(self.layers)}; use .layers")
        return self.layers[0]

    # -- construction -------------------------------------------------------------------------

    def _build(self, full_cfg, shards: _Shards) -> None:
        """Layers 0..L (L the deepest captured layer) loaded by transformers with layer L's MoE block
        replaced by the probe; the gates' own tensors read aside from disk."""
        from transformers import MODEL_MAPPING  # transformers takes seconds to import: only on load

        text_cfg = _text_config(full_cfg)
        cfg = copy.deepcopy(text_cfg)
        last = self.layers[-1]
        _set_n_layers(cfg, last + 1, text_cfg)
        model_cls = _probed_model_class(MODEL_MAPPING[type(text_cfg)], self.arch, last)
        text = self.arch.text_model
        prefix = text or _checkpoint_prefix(shards.file_of, self.arch.layers, self.path)
        # each tensor's name as the language model sees it (a multimodal checkpoint's: without its prefix)
        key = {name: name[len(text):] if text else name for name in shards.file_of if not text or name.startswith(text)}
        layer_re = re.compile(re.escape(prefix + self.arch.layers) + r"\.(\d+)\.")
        layer_of = {name: int(m.group(1)) for name in key if (m := layer_re.match(name))}
        targets = self._targets(model_cls, cfg, {n: k for n, k in key.items() if layer_of.get(n, last) in self.layers})
        names = self._prefix_names(layer_of, targets, prefix)
        base = self._load(model_cls, cfg, {key[name]: shards.get(name) for name in names}, prefix)
        disk_of = {target: name for name, target in targets.items()}
        self._gates = [self._load_gate(shards, disk_of, layer) for layer in self.layers]
        self.info.gate_has_bias = any(g.bias is not None for g in self._gates)
        _check_finite(base, [t for g in self._gates for t in g.tensors()], self.path)
        base = self._place(base)
        base.eval()
        base.requires_grad_(False)
        self._base = base
        self._scores_seen: dict[int, torch.Tensor] = {}
        for gate in self._gates[:-1]:  # the earlier captured layers: their MoE block's input, as it runs
            block = getattr(getattr(base, self.arch.layers)[gate.layer], self.arch.block)
            block.register_forward_pre_hook(self._tap(gate), with_kwargs=True)

    def _tap(self, gate: _Gate):
        """A forward pre-hook recording ``gate``'s scores from its MoE block's input (what the probe
        receives at the deepest layer: the first argument, or ``hidden_states``)."""

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._scores_seen[gate.layer] = self._scores(self._gate_input(hidden), gate)

        return hook

    def _place(self, base: nn.Module) -> nn.Module:
        """The prefix on this process's device, or (``device_map`` ``auto``) split by whole decoder
        layers over its GPUs by accelerate, which moves the hidden states between them; on a machine
        without GPUs, on the CPU. A prefix that does not fit its GPUs is refused, never offloaded."""
        if self.device_map is None:
            return base.to(self.device)
        from accelerate import dispatch_model, infer_auto_device_map  # imported only for a device map

        layer_class = type(getattr(base, self.arch.layers)[0]).__name__
        memory = {i: torch.cuda.mem_get_info(i)[0] for i in self.gpus} if self.gpus else None
        device_map = infer_auto_device_map(base, max_memory=memory, no_split_module_classes=[layer_class])
        if self.gpus and set(map(str, device_map.values())) - set(map(str, self.gpus)):
            raise GrouterError(f"layers <= {self.layers[-1]} of {self.path} do not fit the free memory of GPUs "
                               f"{self.gpus}; give each process more GPUs (fewer processes per node)")
        return dispatch_model(base, device_map=device_map)

    def _gate_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """A gate's input ``[N, H]`` in float32 on the gates' device (a device map leaves it where its layer ran)."""
        return hidden.reshape(-1, hidden.shape[-1]).to(device=self.device, dtype=torch.float32)

    def _targets(self, model_cls: type, cfg, keys: dict[str, str]) -> dict[str, str]:
        """The prefix-model parameter each checkpoint tensor (``keys``: name on disk -> name as the
        language model sees it) loads into, by name on disk; those of other layers than L are not
        asked for."""
        try:
            with torch.device("meta"), _quiet_transformers():
                meta = model_cls(cfg)
        except _NoGate as e:
            raise GrouterError(f"layer {self.layers[-1]} of {self.path} has no MoE gate in {e}; "
                               f"MoE layers are {_fmt_layers(self.info.moe_layers)}") from None
        self._expected = set(meta.state_dict())
        targets = _checkpoint_targets(meta, keys.values())
        return {name: targets[k] for name, k in keys.items()}

    def _prefix_names(self, layer_of: dict[str, int], targets: dict[str, str], prefix: str) -> list[str]:
        """The embedding, every tensor of layers < L, and of layer L those the prefix model has (not
        the experts), exactly as named on disk.

        safetensors returns CPU tensors that map the shard files (no copy), and transformers
        converts them (fusing experts, casting to ``dtype``) into the model, so the prefix's
        parameters are materialised once, in the model.
        """
        L, layers = self.layers[-1], self.arch.layers
        absent = sorted(set(range(L + 1)) - set(layer_of.values()))
        if absent:
            raise GrouterError(
                f"required tensors of layer {absent[0]} ('{prefix}{layers}.{absent[0]}.*') are missing from the "
                f"safetensors weights in {self.path}; the checkpoint is incomplete"
            )
        embedding = [name for name, target in targets.items() if target == f"{self.arch.embedding}.weight"]
        if not embedding:
            raise GrouterError(f"required tensor '{prefix}{self.arch.embedding}.weight' is missing from the safetensors weights "
                               f"in {self.path}; the checkpoint is incomplete")
        earlier = [name for name, i in layer_of.items() if i < L]
        _check_experts_complete(earlier, self.n_experts, self.path)
        at_layer = [name for name, target in targets.items() if layer_of.get(name) == L and target in self._expected]
        return embedding[:1] + earlier + sorted(at_layer)

    def _load(self, model_cls: type, cfg, state_dict: dict[str, torch.Tensor], prefix: str) -> nn.Module:
        """The prefix model, built, loaded and converted by transformers itself."""
        attn = cfg._attn_implementation
        kwargs = {} if attn is None else {"attn_implementation": attn}
        try:
            with _quiet_transformers():
                base, loading = model_cls.from_pretrained(
                    None, config=cfg, state_dict=state_dict, dtype=self.dtype,
                    output_loading_info=True, ignore_mismatched_sizes=True, **kwargs,
                )
        except (RuntimeError, ValueError) as e:  # transformers reports conversion/config failures this way
            raise GrouterError(
                f"could not load layers <= {self.layers[-1]} of {self.path} ({_brief(e)}); the checkpoint is incomplete or does not match config.json"
            ) from None
        _check_loading(loading, prefix, self.arch.after_layers, self.path)
        return base

    def _load_gate(self, shards: _Shards, disk_of: dict[str, str], layer: int) -> _Gate:
        """Layer ``layer``'s gate weight, its bias and the selection bias (those the model has), read
        from disk in float32, and the hash of the weight's bytes as stored."""
        block = f"{self.arch.layers}.{layer}.{self.arch.block}"
        gate = f"{block}.{self.arch.gate}"
        weight_name = disk_of.get(f"{gate}.weight")
        if weight_name is None:
            raise GrouterError(f"gate weight of layer {layer} ('{gate}.weight') is missing from the safetensors weights "
                               f"in {self.path}; the checkpoint is incomplete")
        w = shards.get(weight_name, "gate weight")
        names = {"gate_weight_name": weight_name, "gate_weight_sha256": hashlib.sha256(_raw_bytes(w)).hexdigest()}
        _check_shape(weight_name, w, (self.n_experts, self.info.hidden_size), self.path)
        gate_b = self._gate_vector(shards, disk_of, f"{gate}.bias", "gate bias", layer, names)
        bias = self.arch.correction_bias
        selection = None if bias is None else self._gate_vector(shards, disk_of, f"{block}.{bias}", "selection bias",
                                                                layer, names)
        return _Gate(layer, w.to(device=self.device, dtype=torch.float32), gate_b, selection, names)

    def _gate_vector(self, shards: _Shards, disk_of: dict[str, str], target: str, what: str, layer: int,
                     names: dict) -> torch.Tensor | None:
        """The ``[E]`` tensor that loads into ``target``, in float32 on the device, or None when the
        model has no such tensor. One on disk that the model would not use is refused."""
        name = disk_of.get(target)
        if target not in self._expected:
            if name is not None:
                raise GrouterError(
                    f"{what} {name!r} is in the checkpoint but the {self.info.model_type} gate of the installed transformers "
                    "has none, so the model does not route by it; the checkpoint does not match its model_type"
                )
            return None
        if name is None:  # (transformers reports missing parameters, not always missing buffers)
            raise GrouterError(f"{what} of layer {layer} ('{target}') is missing from the safetensors weights in "
                               f"{self.path}; the checkpoint is incomplete")
        t = shards.get(name, what)
        _check_shape(name, t.reshape(-1), (self.n_experts,), self.path)
        names[what.replace(" ", "_") + "_name"] = name
        return t.reshape(-1).to(device=self.device, dtype=torch.float32)

    # -- use -----------------------------------------------------------------------------------

    @torch.no_grad()
    def router_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The scores (float32) the captured layers route ``input_ids`` ``[B, T]`` by: ``[B, T, E]``
        for one layer, ``[B, T, H, E]`` for H layers (in the order of ``layers``)."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise GrouterError(f"input_ids must be a [batch, seq] integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
        shape = (*ids.shape, *score_shape(len(self.layers), self.n_experts))
        if ids.numel() == 0:
            return torch.zeros(shape, dtype=torch.float32, device=self.device)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise GrouterError(
                f"token id {hi if hi >= self.vocab_size else lo} is outside the source model's vocabulary (0..{self.vocab_size - 1}); "
                "tokenize with the source model's tokenizer"
            )
        ids = ids.to(device=self.device, dtype=torch.long)
        self._scores_seen.clear()
        try:
            self._base(input_ids=ids, use_cache=False)
        except _GateInput as cap:
            hidden = cap.hidden
        else:  # pragma: no cover - the probe always fires
            raise RuntimeError("the gate probe of layer L was not reached")
        last = self._scores(self._gate_input(hidden), self._gates[-1])
        scores = [self._scores_seen.pop(g.layer) for g in self._gates[:-1]] + [last]
        return torch.stack(scores, dim=1).reshape(shape)

    def _scores(self, h: torch.Tensor, gate: _Gate) -> torch.Tensor:
        """What ``gate``'s router runs its top-k on, from the gate input ``h`` ``[N, H]``."""
        logits = h @ gate.weight.T
        if gate.bias is not None:
            logits = logits + gate.bias
        if self.score_function == "sigmoid":
            scores = logits.sigmoid()
        elif gate.selection is not None:  # a selection bias on softmax probabilities (Ernie-4.5)
            scores = logits.softmax(dim=-1)
        else:  # softmax is monotonic: the raw logits select the same experts
            return logits
        return scores if gate.selection is None else scores + gate.selection

    def _formula(self, gate: _Gate) -> str:
        logits = "H @ W^T" + (" + b" if gate.bias is not None else "")
        if self.score_function == "softmax" and gate.selection is None:
            return logits
        scores = f"{self.score_function}({logits})"
        return scores + (" + e_score_correction_bias" if gate.selection is not None else "")

    def describe(self) -> dict:
        """JSON-able provenance of the captured gates, and what exactly their scores are: one gate's
        fields at the top level, or several under ``gates`` (one entry per layer)."""
        desc = {
            "path": str(self.path.resolve()),
            "model_type": self.info.model_type,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "hidden_size": self.info.hidden_size,
            "moe_layers": list(self.info.moe_layers),
            "score_function": self.score_function,
            "includes_bias": self.includes_bias,
            "selection": self.info.selection,
            **describe_gates([{"layer": g.layer, "scores": self._formula(g), **g.names} for g in self._gates],
                             self.n_layers),
        }
        if self.info.groups is not None:
            desc["n_group"], desc["topk_group"] = self.info.groups
            desc["group_score"], desc["group_fill"] = self.arch.groups, str(self.arch.group_fill)
        return desc

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


def describe_gates(gates: list[dict], n_layers: int) -> dict:
    """The captured gates in a source's ``describe()``: one gate's fields at the top level (the
    layout of one-layer targets), several under ``gates`` with ``layers``, ``n_layers`` (the
    source's depth) and ``scores`` (their formula when they share one)."""
    if len(gates) == 1:
        return dict(gates[0])
    formulas = {g["scores"] for g in gates}
    return {"layers": [g["layer"] for g in gates], "n_layers": n_layers, "gates": gates,
            "scores": formulas.pop() if len(formulas) == 1 else "per layer (see gates)"}


def resolve_layers(layer, layers, moe: list[int], n_layers: int, where: str) -> list[int]:
    """The MoE layers to capture, in increasing order: ``layer`` (one; the first MoE layer when both
    are None) or ``layers`` (a list, or ``"all"``: every MoE layer), each checked."""
    if layer is not None and layers is not None:
        raise GrouterError("pass either one layer or a list of layers, not both")
    if layers is None:
        return [moe[0] if layer is None else _check_layer(layer, moe, n_layers, where)]
    if isinstance(layers, str):
        if layers != "all":
            raise GrouterError(f"layers must be a list of layer indices or 'all', got {layers!r}")
        return list(moe)
    chosen = [_check_layer(x, moe, n_layers, where) for x in layers]
    if not chosen or len(set(chosen)) != len(chosen):
        raise GrouterError(f"layers must list distinct MoE layers, got {list(layers)}; MoE layers are {_fmt_layers(moe)}")
    return sorted(chosen)


def _check_layer(layer, moe: list[int], n_layers: int, where: str) -> int:
    """``layer``, if it is the index of a MoE layer of ``where``."""
    try:
        if isinstance(layer, bool):
            raise TypeError
        layer = operator.index(layer)
    except TypeError:
        raise GrouterError(f"layer must be an integer layer index, got {layer!r}; MoE layers are {_fmt_layers(moe)}") from None
    if not 0 <= layer < n_layers:
        raise GrouterError(
            f"layer {layer} is out of range: {where} has {n_layers} layers (0..{n_layers - 1}); "
            f"MoE layers are {_fmt_layers(moe)}"
        )
    if layer not in moe:
        raise GrouterError(f"layer {layer} of {where} is not a MoE layer (it has a dense MLP and no gate); MoE layers are {_fmt_layers(moe)}")
    return layer


def _check_loading(loading: dict, prefix: str, after_layers: tuple[str, ...], path: Path) -> None:
    """transformers' loading report of the prefix model: every parameter but those of the modules
    that run after the layers (the final norm: not part of the prefix) must have been loaded, at
    its configured shape. Parameters are named as in the checkpoint (``prefix`` + module name)."""
    missing = sorted(prefix + k for k in loading.get("missing_keys", ()) if k.split(".")[0] not in after_layers)
    if missing:
        raise GrouterError(
            f"required tensor(s) missing from the safetensors weights in {path} "
            f"(model parameters {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); the checkpoint is incomplete"
        )
    mismatched = sorted(loading.get("mismatched_keys", ()), key=str)
    if mismatched:
        key, *shapes = mismatched[0]
        got = f": {tuple(shapes[0])} in the checkpoint, {tuple(shapes[1])} from config.json" if len(shapes) == 2 else ""
        raise GrouterError(f"shape mismatch for {prefix}{key} in {path}{got}; the config does not match the checkpoint")


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


def _check_finite(base: nn.Module, gate: list[torch.Tensor], path: Path) -> None:
    """A third-party checkpoint carries no checksum grouter can verify: its shapes are checked by
    the load against config.json, and every tensor read must at least be finite."""
    for name, t in [*base.state_dict().items(), *(("gate", g) for g in gate)]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise GrouterError(f"{path} holds NaN or inf in {name!r}: the checkpoint is corrupt; re-download it")


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
