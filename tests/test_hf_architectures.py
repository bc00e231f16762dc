"""Capture from every supported Hugging Face MoE architecture: the recorded scores are the gate's own.

For each architecture a tiny random model is built from its config class and saved
(``save_pretrained(safe_serialization=True)``); nothing is downloaded. A forward pre-hook on the
gate module of the full model gives the gate's input, from which the test computes the gate's
scores itself (its own weight, bias and selection bias), and a forward hook on the gate gives the
experts the model chose. Capture must reproduce the scores within float16 rounding, their top-k
must be the model's choice, the default layer must be the first MoE layer, and only the prefix may
be read.
"""

import inspect
import json
from itertools import chain

import numpy as np

import pytest
import torch
import transformers  # a hard dependency: a missing install must fail, not skip
from safetensors import safe_open
from torch import nn

from grouter.errors import GrouterError
from grouter.hf_source import (
    ARCHITECTURES,
    REFUSED_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    HFRouterPrefix,
    group_limited_topk,
    inspect_hf_moe,
)

VOCAB, SEQ, BATCH = 256, 12, 3
E, K = 8, 2

# Sizes every config gets, where its class takes them (the config classes name their fields differently).
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_hidden_layers=3, max_position_embeddings=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts_per_tok=K, num_experts=E, num_local_experts=E, n_routed_experts=E, n_shared_experts=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
    moe_num_experts=E, moe_topk=K, first_k_dense_replace=1, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
    linear_value_head_dim=16, sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

# Vision towers of the multimodal cases, as small as their config classes allow.
VISION = dict(num_hidden_layers=1, depth=1, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_heads=2,
              image_size=28, patch_size=14, out_hidden_size=64, vision_output_dim=64, projector_input_dim=64,
              projector_output_dim=64)
HYBRID = ["linear_attention", "full_attention", "linear_attention"]
MLA_INDEXER = dict(num_key_value_heads=4, index_topk=4, index_head_dim=16, index_n_heads=2)

# case id -> (model_type, config overrides, (score function, selection bias in the scores, gate bias)).
# The expected first MoE layer is read from the built model itself (the layers whose block has a gate).
CASES = {
    "afmoe": ("afmoe", dict(num_dense_layers=1), ("sigmoid", True, False)),
    "aria": ("aria", dict(text_config={}, vision_config=dict(model_type="idefics3_vision")), ("softmax", False, False)),
    "axk1": ("axk1", {}, ("sigmoid", True, False)),
    "axk2": ("axk2", MLA_INDEXER, ("sigmoid", True, False)),
    "axk2-groups": ("axk2", dict(MLA_INDEXER, n_group=4, topk_group=2), ("sigmoid", True, False)),
    "bailing_hybrid": ("bailing_hybrid", {}, ("sigmoid", True, False)),
    "beam": ("beam", dict(mlp_layer_types=["dense", "sparse", "sparse"]), ("sigmoid", True, False)),
    "cohere2_moe": ("cohere2_moe", dict(mlp_layer_types=["dense", "sparse", "sparse"], expert_selection_fn="sigmoid"),
                    ("sigmoid", False, False)),
    "dbrx": ("dbrx", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                          ffn_config=dict(hidden_size=64, ffn_hidden_size=32, moe_num_experts=E, moe_top_k=K)),
             ("softmax", False, False)),
    "deepseek_v2": ("deepseek_v2", {}, ("softmax", False, False)),
    "deepseek_v2-groups": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=1),
                           ("softmax", False, False)),
    "deepseek_v3": ("deepseek_v3", {}, ("sigmoid", True, False)),  # first_k_dense_replace=1: first MoE layer is 1
    "deepseek_v3-groups": ("deepseek_v3", dict(n_group=4, topk_group=2), ("sigmoid", True, False)),
    "deepseek_v32": ("deepseek_v32", MLA_INDEXER, ("sigmoid", True, False)),
    "dots1": ("dots1", {}, ("sigmoid", True, False)),
    "ernie4_5_moe": ("ernie4_5_moe", dict(moe_k=K, moe_layer_start_index=1), ("softmax", True, False)),
    "exaone_moe": ("exaone_moe", {}, ("sigmoid", True, False)),
    "flex_olmo": ("flex_olmo", {}, ("softmax", False, False)),
    "flint": ("flint", dict(mlp_only_layers=[0]), ("sigmoid", False, False)),
    "glm4_moe": ("glm4_moe", {}, ("sigmoid", True, False)),
    "glm4_moe_lite": ("glm4_moe_lite", {}, ("sigmoid", True, False)),
    "glm4v_moe": ("glm4v_moe", dict(text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 1, 1],
                                                                            partial_rotary_factor=0.5))), ("sigmoid", True, False)),
    "glm_moe_dsa": ("glm_moe_dsa", MLA_INDEXER, ("sigmoid", True, False)),
    "gpt_oss": ("gpt_oss", {}, ("softmax", False, True)),
    "granitemoe": ("granitemoe", {}, ("softmax", False, False)),
    "granitemoe_swa": ("granitemoe_swa", {}, ("softmax", False, False)),
    "granitemoehybrid": ("granitemoehybrid", dict(layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=16,
                                                  mamba_d_state=16, mamba_expand=1, shared_intermediate_size=32),
                         ("softmax", False, False)),
    "granitemoeshared": ("granitemoeshared", dict(shared_intermediate_size=32), ("softmax", False, False)),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", {}, ("softmax", False, False)),
    "hy_v3": ("hy_v3", {}, ("sigmoid", True, False)),
    "hy_v4": ("hy_v4", {}, ("sigmoid", True, False)),
    "jamba": ("jamba", dict(use_mamba_kernels=False, attn_layer_period=2, attn_layer_offset=1), ("softmax", False, False)),
    "jetmoe": ("jetmoe", dict(kv_channels=16), ("softmax", False, False)),
    "kimi_linear": ("kimi_linear", dict(linear_head_dim=16, linear_num_heads=2, layer_types=HYBRID), ("sigmoid", True, False)),
    "lara_mini": ("lara_mini", {}, ("softmax", False, False)),
    "lfm2_moe": ("lfm2_moe", dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1), ("sigmoid", True, False)),
    "llama4": ("llama4", dict(text_config=dict(interleave_moe_layer_step=2)), ("sigmoid", False, False)),
    "llama4_text": ("llama4_text", dict(interleave_moe_layer_step=2), ("sigmoid", False, False)),
    "mellum": ("mellum", dict(mlp_layer_types=["dense", "sparse", "sparse"]), ("softmax", False, False)),
    "mimo_v2_flash": ("mimo_v2_flash", {}, ("sigmoid", True, False)),
    "minimax": ("minimax", {}, ("softmax", False, False)),
    "minimax_m2": ("minimax_m2", {}, ("sigmoid", True, False)),
    "mixtral": ("mixtral", {}, ("softmax", False, False)),
    "nemotron_h": ("nemotron_h", dict(layers_block_type=["mamba", "moe", "attention"], mamba_num_heads=4, mamba_head_dim=16,
                                      ssm_state_size=16, n_groups=1), ("sigmoid", True, False)),
    "olmoe": ("olmoe", {}, ("softmax", False, False)),
    "phimoe": ("phimoe", {}, ("softmax", False, False)),
    "qwen2_moe": ("qwen2_moe", dict(mlp_only_layers=[0]), ("softmax", False, False)),
    "qwen3_5_moe": ("qwen3_5_moe", dict(text_config=dict(layer_types=HYBRID)), ("softmax", False, False)),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", dict(layer_types=HYBRID), ("softmax", False, False)),
    "qwen3_moe": ("qwen3_moe", dict(decoder_sparse_step=2), ("softmax", False, False)),
    "qwen3_next": ("qwen3_next", dict(layer_types=HYBRID, mlp_only_layers=[0]), ("softmax", False, False)),
    "qwen3_vl_moe": ("qwen3_vl_moe", dict(text_config=dict(mlp_only_layers=[0])), ("softmax", False, False)),
    "solar_open": ("solar_open", {}, ("sigmoid", True, False)),
}
SELECTION_BIASES = ("e_score_correction_bias", "expert_bias")


def _sized(cls, sizes: dict, overrides: dict) -> dict:
    fields = set(inspect.signature(cls.__init__).parameters)
    return {**{k: v for k, v in sizes.items() if k in fields}, **overrides}


def _tiny_config(model_type: str, overrides: dict):
    """A tiny config; a multimodal one (``text_config`` in ``overrides``) gets a tiny vision tower too."""
    cls = transformers.CONFIG_MAPPING[model_type]
    if "text_config" not in overrides:
        return cls(**_sized(cls, TINY, overrides))
    subs = {}
    for name, sub in cls.sub_configs.items():
        given = overrides.get(name, {})
        if "model_type" in given:  # a sub-config of any type (AutoConfig): sized by its own class
            sub = transformers.CONFIG_MAPPING[given["model_type"]]
        subs[name] = _sized(sub, TINY if name == "text_config" else VISION, given)
    return cls(**subs)


def _build(model_type: str, overrides: dict) -> nn.Module:
    auto = transformers.AutoModelForImageTextToText if "text_config" in overrides else transformers.AutoModelForCausalLM
    return auto.from_config(_tiny_config(model_type, overrides)).eval()


def _base(model) -> nn.Module:
    """The language model's base model (of a multimodal model: its decoder's)."""
    if model.config.get_text_config() is not model.config:
        decoder = model.get_decoder()
        return getattr(decoder, "model", decoder)
    return getattr(model, "model", None) or model.base_model


def _moe_blocks(model) -> dict[int, tuple[nn.Module, nn.Module]]:
    """Layer index -> (MoE block, gate module) of every MoE layer of the built model."""
    arch = ARCHITECTURES[model.config.model_type]
    out = {}
    for i, layer in enumerate(getattr(_base(model), arch.layers)):
        block = getattr(layer, arch.block, None)
        gate = next((getattr(block, g) for g in ("gate", "router") if isinstance(getattr(block, g, None), nn.Module)), None)
        if gate is not None:
            out[i] = (block, gate)
    return out


def _gate_linear(gate: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate's weight [E, H] and bias: its own, or those of the one Linear inside it."""
    if isinstance(getattr(gate, "weight", None), torch.Tensor):
        return gate.weight, getattr(gate, "bias", None)
    (linear,) = [m for m in gate.modules() if isinstance(m, nn.Linear)]
    return linear.weight, linear.bias


def _selection_bias(block: nn.Module) -> torch.Tensor | None:
    found = [t for n, t in chain(block.named_parameters(), block.named_buffers()) if n.split(".")[-1] in SELECTION_BIASES]
    assert len(found) <= 1
    return found[0] if found else None


def _model_choice(out, experts_args: tuple, k: int) -> torch.Tensor:
    """The experts ``[N, k]`` the router chose, from its forward output or the experts' input."""
    parts = out if isinstance(out, tuple) else (out,)
    if torch.is_tensor(out):  # DBRX: the router returns logits only; the block hands its choice to the experts
        parts = experts_args
    if len(parts) == 5 and isinstance(parts[3], list):  # JetMoE: tokens sorted by expert, with per-expert counts
        sorted_experts, token = parts[0], parts[1]
        expert = torch.repeat_interleave(torch.arange(len(parts[3])), torch.tensor(parts[3]))
        chosen = torch.zeros(int(token.max()) + 1, len(parts[3]), dtype=torch.bool)
        chosen[token, expert] = True
        assert len(sorted_experts) == chosen.sum()
        return chosen.float().topk(k, dim=-1).indices
    ints = [t for t in parts if torch.is_tensor(t) and t.dtype == torch.int64 and t.dim() == 2 and t.shape[-1] == k]
    if ints:
        return ints[0]
    # Llama-4: the router returns the sigmoid of its top-k logits scattered over zeros
    assert (parts[0] > 0).sum(-1).eq(k).all()
    return parts[0].topk(k, dim=-1).indices


def _reference(model, layer: int, ids: torch.Tensor, score: str):
    """The gate's own scores of ``layer`` (from its input, seen by a pre-hook) and the model's choice."""
    block, gate = _moe_blocks(model)[layer]
    seen = {}
    pre = gate.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))  # hooks return None
    post = gate.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    hooks = [pre, post]
    if isinstance(getattr(block, "experts", None), nn.Module):
        hooks.append(block.experts.register_forward_pre_hook(lambda mod, args: seen.update(experts=args)))
    # Llama4ForConditionalGeneration's forward fails on text-only input in this transformers release
    # ('MoeCausalLMOutputWithPast' has no 'image_outputs'); text runs through its language model alone anyway.
    runner = model.language_model if model.config.model_type == "llama4" else model
    with torch.no_grad():
        runner(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    w, b = _gate_linear(gate)
    h = seen["h"].reshape(-1, w.shape[1]).float()
    logits = h @ w.detach().float().T + (0 if b is None else b.detach().float())
    bias = _selection_bias(block)
    scores = logits.sigmoid() if score == "sigmoid" else logits.softmax(-1) if bias is not None else logits
    scores = scores if bias is None else scores + bias.detach().float().reshape(-1)
    return scores.reshape(*ids.shape, -1), _model_choice(seen["out"], seen.get("experts", ()), K), logits


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """A saved tiny model of one architecture, the gate's own scores of its first MoE layer, and the capture."""
    model_type, overrides, expected = CASES[request.param]
    torch.manual_seed(0)
    model = _build(model_type, overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for name, buf in model.named_buffers():
            if name.split(".")[-1] in SELECTION_BIASES:
                buf.add_(torch.randn_like(buf) * 0.3)
    d = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(d, safe_serialization=True)
    moe_layers = sorted(_moe_blocks(model))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ref, choice, logits = _reference(model, moe_layers[0], ids, expected[0])
    prefix = HFRouterPrefix(d)
    return dict(id=request.param, model_type=model_type, dir=d, ids=ids, ref=ref, choice=choice, logits=logits,
                moe_layers=moe_layers, expected=expected, prefix=prefix, scores=prefix.router_logits(ids), model=model)


def test_scores_are_the_gates_own(case):
    """(1) Capture equals the gate's own scores from its input, within float16 rounding."""
    out = case["scores"]
    assert out.dtype == torch.float32 and out.shape == (BATCH, SEQ, E)
    torch.testing.assert_close(out, case["ref"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out.half(), case["ref"].half(), rtol=2 ** -10, atol=2 ** -14)
    assert case["ref"].std() > 0.01  # non-trivial scores


def test_top_k_is_the_models_choice(case):
    """(2) The top-k of the recorded scores (group-limited where the model limits groups) is the
    model's own choice, seen at the router's output."""
    prefix, out = case["prefix"], case["scores"].reshape(-1, E)
    desc = prefix.describe()
    if desc["selection"] == "group_limited_topk":
        groups = desc["n_group"], desc["topk_group"], desc["group_score"], float(desc["group_fill"])
        chosen = group_limited_topk(out, prefix.top_k, *groups)
        # the group limit matters here: the plain top-k picks some expert the model does not
        assert not torch.equal(out.topk(prefix.top_k).indices.sort().values, case["choice"].sort(-1).values)
    else:
        chosen = out.topk(prefix.top_k, dim=-1).indices
    assert torch.equal(chosen.sort(-1).values, case["choice"].sort(-1).values)
    if case["expected"][1]:  # the selection bias matters: the logits alone would choose otherwise
        assert not torch.equal(case["logits"].topk(prefix.top_k).indices.sort(-1).values, case["choice"].sort(-1).values)


def test_several_layers_are_each_layers_own_scores(case):
    """(1b) Every MoE layer at once, ``[B, T, H, E]``: each layer's gate's own scores (the layers
    before the deepest run whole, their gate inputs seen by hooks)."""
    moe = case["moe_layers"]
    if ARCHITECTURES[case["model_type"]].first_moe_layer_only:  # refused, not captured wrong
        with pytest.raises(GrouterError, match=f"only the first MoE layer \\({moe[0]}\\) .* pass --layer {moe[0]}"):
            HFRouterPrefix(case["dir"], layers="all")
        return
    prefix = HFRouterPrefix(case["dir"], layers="all")
    out = prefix.router_logits(case["ids"])
    assert prefix.layers == moe and out.shape == (BATCH, SEQ, *((len(moe), E) if len(moe) > 1 else (E,)))
    scores = out if len(moe) > 1 else out[:, :, None]
    for h, layer in enumerate(moe):
        ref = _reference(case["model"], layer, case["ids"], case["expected"][0])[0]
        torch.testing.assert_close(scores[:, :, h], ref, rtol=1e-3, atol=1e-4)


def test_manifest_fields_and_default_layer(case):
    """(3) The default layer is the first MoE layer; what the scores are is declared."""
    prefix, (score, selection_bias, gate_bias) = case["prefix"], case["expected"]
    assert prefix.layer == case["moe_layers"][0]
    if case["model_type"] == "deepseek_v3":  # first_k_dense_replace=1: layer 0 is dense
        assert prefix.layer == 1 and case["moe_layers"] == [1, 2]
    assert inspect_hf_moe(case["dir"]).moe_layers == case["moe_layers"]  # the config rule matches the model
    assert (prefix.n_experts, prefix.top_k, prefix.vocab_size) == (E, K, VOCAB)
    desc = json.loads(json.dumps(prefix.describe()))
    assert (desc["score_function"], desc["includes_bias"]) == (score, selection_bias or gate_bias)
    assert (prefix.score_function, prefix.includes_bias) == (score, selection_bias or gate_bias)
    assert (desc["layer"], desc["model_type"]) == (prefix.layer, case["model_type"])
    assert desc["selection"] == ("group_limited_topk" if case["id"].endswith("-groups") else "topk")
    assert ("e_score_correction_bias" in desc["scores"]) == selection_bias and ("+ b" in desc["scores"]) == gate_bias
    assert ("selection_bias_name" in desc, "gate_bias_name" in desc) == (selection_bias, gate_bias)


def _disk_tensors(d) -> dict[str, int]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {name: f.get_slice(name).get_shape() for name in f.keys()}


def test_loads_only_the_prefix(case):
    """(4) Only the embedding, the layers before L and, of layer L, all but its experts are read."""
    prefix, model = case["prefix"], case["model"]
    L, arch = prefix.layer, ARCHITECTURES[case["model_type"]]
    names = prefix.loaded_tensor_names
    shapes = {n: shape for n, shape in _disk_tensors(case["dir"]).items() if n.startswith(arch.text_model or "")}
    assert len(names) == len(set(names)) and set(names) <= set(shapes)
    layer_of = {n: int(n.split(f"{arch.layers}.")[1].split(".")[0]) for n in shapes if f".{arch.layers}." in f".{n}"}
    outside = [n for n in names if n not in layer_of]
    assert len(outside) == 1 and "embed" in outside[0] or outside == ["transformer.wte.weight"]  # no head, no final norm
    assert not [n for n in names if layer_of.get(n, -1) > L]
    assert {n for n in shapes if layer_of.get(n, L) < L} <= set(names)  # every earlier tensor is read
    # of layer L: exactly as many values as the layer holds outside its MoE block, plus the gate
    block, gate = _moe_blocks(model)[L]
    layer = getattr(_base(model), arch.layers)[L]
    tensors = lambda m: list(chain(m.parameters(), (b for n, b in m.named_buffers() if n in m.state_dict())))
    not_block = sum(t.numel() for t in tensors(layer)) - sum(t.numel() for t in tensors(block))
    bias = _selection_bias(block)
    gate_values = sum(t.numel() for t in tensors(gate)) + (0 if bias is None or any(bias is t for t in tensors(gate)) else bias.numel())
    read = [n for n in names if layer_of.get(n) == L]
    assert sum(torch.Size(shapes[n]).numel() for n in read) == not_block + gate_values


# --------------------------------------------------------------------------------------------


def test_every_supported_architecture_is_tested_and_known():
    tested = {model_type for model_type, _, _ in CASES.values()}
    assert tested == set(SUPPORTED_MODEL_TYPES)
    known = set(transformers.CONFIG_MAPPING)
    assert set(SUPPORTED_MODEL_TYPES) <= known and set(REFUSED_MODEL_TYPES) <= known
    assert not set(SUPPORTED_MODEL_TYPES) & set(REFUSED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", ["zaya", "longcat_flash", "qwen3_omni_moe", "my_new_moe"])
def test_unsupported_moe_type_is_refused_in_one_line(tmp_path, model_type):
    """(5) An unsupported MoE type gets one line naming the supported list (and, if known, why)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2, "num_experts": 4}))
    for call in (inspect_hf_moe, HFRouterPrefix):
        with pytest.raises(GrouterError, match=rf"unsupported model_type '{model_type}'") as err:
            call(tmp_path)
        msg = str(err.value)
        assert "\n" not in msg and msg.endswith("supported MoE model types: " + ", ".join(SUPPORTED_MODEL_TYPES))
        assert REFUSED_MODEL_TYPES.get(model_type, "no MoE layer grouter can read") in msg


def test_capture_manifest_records_what_the_scores_are(tmp_path, tiny_data):
    """End to end: a DeepSeek-V3-style source (dense layer 0, sigmoid + correction bias, group-limited)
    is captured from layer 1 by default, and targets.json says what the scores are."""
    from grouter.capture import capture
    from grouter.data import Document, PackConfig, pack_documents
    from grouter.formats.targets import Targets

    # a few dozen sequences in the fixture's tokenization keep the capture short
    docs = [Document("prose", f"doc{i}", "The quick brown fox jumps over the lazy dog. " * 40) for i in range(4)]
    data = pack_documents(docs, tiny_data.tokenizer(), tmp_path / "data", PackConfig(seq_len=32, val_fraction=0.2))
    torch.manual_seed(0)
    model = _build("deepseek_v3", dict(vocab_size=data.vocab_size, n_group=4, topk_group=2))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.add_(torch.randn_like(buf) * 0.3)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    capture(tmp_path / "t", source=tmp_path / "src", data=data, top_m=0, progress=False)
    m = json.loads((tmp_path / "t" / "targets.json").read_text())
    assert (m["layer"], m["score_function"], m["includes_bias"]) == (1, "sigmoid", True)
    src = m["source"]
    assert src["scores"] == "sigmoid(H @ W^T) + e_score_correction_bias"
    assert (src["selection"], src["n_group"], src["topk_group"], src["group_score"]) == ("group_limited_topk", 4, 2, "sum_top2")
    idx = np.arange(2)
    expected = HFRouterPrefix(tmp_path / "src").router_logits(data.split("train").batch(idx)["input_ids"]).half().float()
    torch.testing.assert_close(Targets.open(tmp_path / "t").logits("train", idx), expected, rtol=0, atol=0)


def test_missing_selection_bias_is_named(tmp_path):
    """A checkpoint without the selection bias its model routes by is refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    _build("deepseek_v3", {}).save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GrouterError, match=r"missing .*model\.layers\.1\.mlp\.gate\.e_score_correction_bias") as err:
        HFRouterPrefix(tmp_path)
    assert "\n" not in str(err.value)
