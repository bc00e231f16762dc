"""Router-logit capture from Hugging Face MoE checkpoints: exactness, prefix-only loading, errors.

Every model is a tiny random one built from a config and saved sharded; nothing is downloaded.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # a hard dependency: a missing install must fail, not skip
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grouter.data import train_tokenizer
from grouter.errors import GrouterError
from grouter.hf_source import (
    SUPPORTED_MODEL_TYPES,
    HFRouterPrefix,
    inspect_hf_moe,
    is_hf_model_dir,
    load_hf_tokenizer_vocab,
)

VOCAB, SEQ = 128, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=64)

# model_type -> (config kwargs, expected MoE layers, layers to capture: default first + a later one)
ARCHS = {
    # layer 0 dense, layers 1..3 sparse; sliding-window attention on some layers (window < SEQ)
    "qwen2_moe": (dict(num_hidden_layers=4, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       mlp_only_layers=[0], use_sliding_window=True, sliding_window=4, max_window_layers=4),
                  [1, 2, 3], [1, 2]),
    # decoder_sparse_step=2: layers 1 and 3 sparse
    "qwen3_moe": (dict(num_hidden_layers=4, num_experts=8, moe_intermediate_size=16, decoder_sparse_step=2, head_dim=8),
                  [1, 3], [1, 3]),
    "olmoe": (dict(num_hidden_layers=3, num_experts=8), [0, 1, 2], [0, 2]),
    "mixtral": (dict(num_hidden_layers=3, num_local_experts=8, sliding_window=4), [0, 1, 2], [0, 1]),
}


def _config(model_type, **kw):
    return transformers.AutoConfig.for_model(model_type, **{**COMMON, **kw})


def _shard_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.safetensors"))


def _disk_tensors(d: Path) -> dict[str, str]:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def _layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _is_expert(name: str) -> bool:
    return ".experts." in name or ".shared_expert" in name


@pytest.fixture(scope="module", params=list(ARCHS))
def source(request, tmp_path_factory):
    """A saved, sharded tiny model with reference gate logits of every MoE layer."""
    model_type = request.param
    kw, moe_layers, capture = ARCHS[model_type]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(model_type, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    d = tmp_path_factory.mktemp(model_type) / "model"
    model.save_pretrained(d, max_shard_size="24KB")
    assert len(_shard_names(d)) > 2 and (d / "model.safetensors.index.json").is_file()

    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    refs = {}
    for layer in moe_layers:
        gate = model.model.layers[layer].mlp.gate
        seen = {}
        hook = gate.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
        with torch.no_grad():
            model(input_ids=ids)
        hook.remove()
        logits = seen["h"].float() @ gate.weight.detach().float().T
        refs[layer] = logits.reshape(*ids.shape, -1)
        assert refs[layer].std() > 0.1  # non-trivial logits
    return dict(model_type=model_type, dir=d, ids=ids, refs=refs, moe_layers=moe_layers, capture=capture)


def _rewrite(src: Path, dst: Path, keep=lambda name: True, poison=lambda name: False) -> None:
    """Copy a sharded model, dropping tensors for which keep() is False and NaN-filling poison() ones."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(dst / shard))
        (dst / shard).unlink()
        kept = {}
        for name, t in tensors.items():
            if not keep(name):
                continue
            kept[name] = torch.full_like(t, float("nan")) if poison(name) else t
        if kept:
            save_file(kept, str(dst / shard), metadata={"format": "pt"})
            weight_map.update({name: shard for name in kept})
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


# --------------------------------------------------------------------------------------------


def test_inspect(source):
    info = inspect_hf_moe(source["dir"])
    n_layers = ARCHS[source["model_type"]][0]["num_hidden_layers"]
    assert (info.model_type, info.n_layers, info.moe_layers) == (source["model_type"], n_layers, source["moe_layers"])
    assert (info.n_experts, info.top_k, info.vocab_size, info.hidden_size, info.gate_has_bias) == (8, 2, VOCAB, 32, False)
    assert is_hf_model_dir(source["dir"])
    assert source["model_type"] in SUPPORTED_MODEL_TYPES


def test_captured_logits_equal_full_forward(source):
    default = HFRouterPrefix(source["dir"])
    assert default.layer == source["moe_layers"][0]
    for layer in source["capture"]:
        prefix = default if layer == default.layer else HFRouterPrefix(source["dir"], layer=layer)
        out = prefix.router_logits(source["ids"])
        assert out.dtype == torch.float32 and out.shape == (3, SEQ, 8)
        torch.testing.assert_close(out, source["refs"][layer], atol=1e-5, rtol=0)
        assert (prefix.n_experts, prefix.top_k, prefix.vocab_size) == (8, 2, VOCAB)


def test_several_layers_equal_each_layers_gate(source):
    """Every MoE layer at once: [B, T, H, E], each layer's own gate logits; one prefix up to the
    deepest layer is read, and each gate is recorded with its hash."""
    prefix = HFRouterPrefix(source["dir"], layers="all")
    assert prefix.layers == source["moe_layers"] and prefix.n_layers == ARCHS[source["model_type"]][0]["num_hidden_layers"]
    out = prefix.router_logits(source["ids"])
    assert out.dtype == torch.float32 and out.shape == (3, SEQ, len(source["moe_layers"]), 8)
    for h, layer in enumerate(source["moe_layers"]):
        torch.testing.assert_close(out[:, :, h], source["refs"][layer], atol=1e-5, rtol=0)
    # twice: the hooks of the earlier layers leave nothing behind between calls
    torch.testing.assert_close(prefix.router_logits(source["ids"][:1]), out[:1], atol=1e-5, rtol=0)
    names = prefix.loaded_tensor_names
    assert len(names) == len(set(names)) and not [n for n in names if (_layer_of(n) or 0) > source["moe_layers"][-1]]
    desc = json.loads(json.dumps(prefix.describe()))
    assert desc["layers"] == source["moe_layers"] and "layer" not in desc and desc["scores"] == "H @ W^T"
    assert len({g["gate_weight_sha256"] for g in desc["gates"]}) == len(source["moe_layers"])
    with pytest.raises(GrouterError, match="captures layers"):
        prefix.layer  # noqa: B018


def test_loads_only_the_prefix(source):
    on_disk = _disk_tensors(source["dir"])
    for layer in source["capture"]:
        names = HFRouterPrefix(source["dir"], layer=layer).loaded_tensor_names
        assert len(names) == len(set(names))
        assert not [n for n in names if _layer_of(n) is None and n != "model.embed_tokens.weight"]  # no lm_head, no final norm
        assert not [n for n in names if (_layer_of(n) or 0) > layer]
        at_layer = [n for n in names if _layer_of(n) == layer]
        assert not [n for n in at_layer if _is_expert(n)]
        assert {n.split(".")[3] for n in at_layer} <= {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "block_sparse_moe"}
        assert [n for n in at_layer if n.endswith(".gate.weight")]
        assert not [n for n in at_layer if "shared_expert_gate" in n]
        # every tensor of the earlier layers is needed, and read
        earlier = {n for n in on_disk if _layer_of(n) is not None and _layer_of(n) < layer}
        assert earlier | {"model.embed_tokens.weight"} <= set(names)


@pytest.mark.parametrize("mode", ["removed", "nan"])
def test_capture_ignores_everything_after_the_gate(source, mode, tmp_path):
    layer = source["capture"][-1]

    def after_gate(name):
        i = _layer_of(name)
        if i is None:
            return name != "model.embed_tokens.weight"  # lm_head, final norm
        return i > layer or (i == layer and _is_expert(name))

    dst = tmp_path / "model"
    if mode == "removed":
        _rewrite(source["dir"], dst, keep=lambda n: not after_gate(n))
        assert not [n for n in _disk_tensors(dst) if after_gate(n)]
    else:
        _rewrite(source["dir"], dst, poison=after_gate)
    out = HFRouterPrefix(dst, layer=layer).router_logits(source["ids"])
    torch.testing.assert_close(out, source["refs"][layer], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_captured_logits_are_causal(source):
    prefix = HFRouterPrefix(source["dir"], layer=source["capture"][-1])
    ids = source["ids"][:1]
    base = prefix.router_logits(ids)
    for t in (0, 4, SEQ - 2):
        changed = ids.clone()
        changed[0, t + 1:] = (changed[0, t + 1:] + 1 + torch.arange(SEQ - t - 1)) % VOCAB
        out = prefix.router_logits(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])
    # a sequence's logits do not depend on the rest of its batch
    torch.testing.assert_close(prefix.router_logits(source["ids"])[:1], base, atol=1e-5, rtol=0)


def test_describe_is_json_and_hashes_the_gate(source):
    prefix = HFRouterPrefix(source["dir"])
    desc = json.loads(json.dumps(prefix.describe()))
    assert (desc["model_type"], desc["layer"], desc["n_experts"], desc["top_k"]) == (source["model_type"], prefix.layer, 8, 2)
    assert Path(desc["path"]) == source["dir"].resolve()
    name = desc["gate_weight_name"]
    with safe_open(str(source["dir"] / _disk_tensors(source["dir"])[name]), "pt") as f:
        w = f.get_tensor(name)
    assert desc["gate_weight_sha256"] == hashlib.sha256(w.contiguous().numpy().tobytes()).hexdigest()
    other = HFRouterPrefix(source["dir"], layer=source["capture"][-1]).describe()
    assert other["gate_weight_sha256"] != desc["gate_weight_sha256"]


# --------------------------------------------------------------------------------------------
# one architecture is enough for the rest


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    torch.manual_seed(0)
    kw = ARCHS["qwen2_moe"][0]
    model = transformers.AutoModelForCausalLM.from_config(_config("qwen2_moe", **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    d = tmp_path_factory.mktemp("q2") / "model"
    model.save_pretrained(d, max_shard_size="24KB")
    return d


def test_single_file_checkpoint_and_bfloat16(qwen2, tmp_path):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ref = HFRouterPrefix(qwen2, layer=2).router_logits(ids)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(qwen2 / "config.json", single / "config.json")
    merged = {}
    for shard in _shard_names(qwen2):
        merged.update(load_file(str(qwen2 / shard)))
    save_file(merged, str(single / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(HFRouterPrefix(single, layer=2).router_logits(ids), ref, atol=1e-5, rtol=0)
    half = HFRouterPrefix(qwen2, layer=2, dtype=torch.bfloat16).router_logits(ids)
    assert half.dtype == torch.float32
    assert (half - ref).abs().max() < 0.1 * ref.abs().max()


def test_bfloat16_checkpoint(qwen2, tmp_path):
    """A bf16 checkpoint is cast by transformers; the gate hash covers the bf16 bytes as stored."""
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen2).to(torch.bfloat16)
    d = tmp_path / "bf16"
    model.save_pretrained(d, max_shard_size="24KB")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    gate = ref_model.model.layers[2].mlp.gate
    seen = {}
    hook = gate.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
    with torch.no_grad():
        ref_model(input_ids=ids)
    hook.remove()
    ref = (seen["h"] @ gate.weight.detach().T).reshape(2, SEQ, -1)
    prefix = HFRouterPrefix(d, layer=2)
    torch.testing.assert_close(prefix.router_logits(ids), ref, atol=1e-5, rtol=0)
    name = "model.layers.2.mlp.gate.weight"
    with safe_open(str(d / _disk_tensors(d)[name]), "pt") as f:
        w = f.get_tensor(name)
    assert w.dtype == torch.bfloat16
    assert prefix.describe()["gate_weight_sha256"] == hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(qwen2):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    cpu = HFRouterPrefix(qwen2, layer=2).router_logits(ids)
    gpu = HFRouterPrefix(qwen2, layer=2, device="cuda").router_logits(ids)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_device_map_gives_the_scores_of_one_device(qwen2, monkeypatch):
    """``--device-map auto``: the prefix placed by accelerate, layer by layer (on a machine without
    GPUs, all on the CPU; a multi-GPU split is the GPU check's), scores as without it, every
    captured layer's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this test is the CPU case everywhere
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(6))
    ref = HFRouterPrefix(qwen2, layers=[1, 2]).router_logits(ids)
    mapped = HFRouterPrefix(qwen2, layers=[1, 2], device_map="auto")
    assert mapped.gpus == [] and mapped.device == torch.device("cpu")
    assert hasattr(mapped._base, "hf_device_map"), "placed by accelerate"
    torch.testing.assert_close(mapped.router_logits(ids), ref, atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (benchmarks/gpu_check.sh): a source split "
                    "over a process's GPUs")
def test_device_map_splits_a_source_over_two_gpus(qwen2, monkeypatch):
    """``--device-map auto`` on 2 GPUs that each have room for about half the prefix: accelerate puts whole
    decoder layers on both, the hidden states move between them, and every captured layer's scores are
    the one-device scores."""
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    ref = HFRouterPrefix(qwen2, layers=[1, 2], device="cuda:0").router_logits(ids).cpu()
    size = sum(p.numel() * p.element_size() for p in HFRouterPrefix(qwen2, layers=[1, 2])._base.parameters())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(size * 0.75), int(size * 0.75)))
    mapped = HFRouterPrefix(qwen2, layers=[1, 2], device_map="auto")
    placed = {str(d) for d in mapped._base.hf_device_map.values()}
    assert {"0", "1"} <= placed, mapped._base.hf_device_map
    torch.testing.assert_close(mapped.router_logits(ids).cpu(), ref, atol=1e-4, rtol=1e-4)


def test_process_gpus_share_a_node_between_its_processes(monkeypatch):
    from grouter.hf_source import process_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert process_gpus() == [4, 5]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    with pytest.raises(GrouterError, match="16 processes per node share 8 GPUs"):
        process_gpus()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    assert process_gpus() == list(range(8))


def test_dense_or_unsupported_models_are_refused(tmp_path):
    for model_type in ("qwen3", "llama"):
        d = tmp_path / model_type
        cfg = _config(model_type, num_hidden_layers=2)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        assert is_hf_model_dir(d)
        with pytest.raises(GrouterError, match="unsupported model_type .*supported MoE model types: .*qwen2_moe"):
            inspect_hf_moe(d)
        with pytest.raises(GrouterError, match="unsupported model_type"):
            HFRouterPrefix(d)
    no_experts = tmp_path / "no_experts"
    no_experts.mkdir()
    (no_experts / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts": 0, "num_hidden_layers": 2}))
    with pytest.raises(GrouterError, match="no MoE layer"):
        inspect_hf_moe(no_experts)


def test_bad_directories(tmp_path):
    assert not is_hf_model_dir(tmp_path)
    with pytest.raises(GrouterError, match="config.json is missing"):
        inspect_hf_moe(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not is_hf_model_dir(tmp_path)
    with pytest.raises(GrouterError, match="not valid JSON"):
        inspect_hf_moe(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": "three"}))
    with pytest.raises(GrouterError, match="invalid Hugging Face config .*num_hidden_layers"):
        inspect_hf_moe(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "grouter-moe-lm", "version": 1, "model_type": "mixtral"}))
    assert not is_hf_model_dir(tmp_path)
    with pytest.raises(GrouterError, match="grouter checkpoint"):
        inspect_hf_moe(tmp_path)
    with pytest.raises(GrouterError, match="not a directory"):
        inspect_hf_moe(tmp_path / "absent")


def test_bad_layer_indices(qwen2):
    with pytest.raises(GrouterError, match=r"layer 4 is out of range.*4 layers.*MoE layers are 1\.\.3"):
        HFRouterPrefix(qwen2, layer=4)
    with pytest.raises(GrouterError, match="out of range"):
        HFRouterPrefix(qwen2, layer=-1)
    with pytest.raises(GrouterError, match=r"layer 0 .* is not a MoE layer.*MoE layers are 1\.\.3"):
        HFRouterPrefix(qwen2, layer=0)


@pytest.mark.parametrize("missing", [
    "model.layers.2.self_attn.q_proj.weight",  # layer L's attention
    "model.layers.2.mlp.gate.weight",  # layer L's gate
    "model.layers.1.post_attention_layernorm.weight",  # an earlier layer
    "model.layers.1.mlp.experts.3.down_proj.weight",  # an earlier layer's expert
    "model.embed_tokens.weight",
])
def test_missing_prefix_tensor_is_named(qwen2, tmp_path, missing):
    dst = tmp_path / "model"
    _rewrite(qwen2, dst, keep=lambda n: n != missing)
    with pytest.raises(GrouterError, match="missing") as err:
        HFRouterPrefix(dst, layer=2)
    msg = str(err.value)
    assert "\n" not in msg
    if "post_attention_layernorm" in missing:  # reported by transformers under the module's name
        assert "layers.1.post_attention_layernorm.weight" in msg
    else:
        assert missing in msg


def test_missing_shard_file_and_shape_mismatch(qwen2, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(qwen2, dst)
    shard = _disk_tensors(dst)["model.layers.2.mlp.gate.weight"]
    (dst / shard).unlink()
    with pytest.raises(GrouterError, match=f"{shard} is missing"):
        HFRouterPrefix(dst, layer=2)
    cfg = json.loads((qwen2 / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(qwen2, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_experts": 6}))
    with pytest.raises(GrouterError, match=r"shape mismatch for model\.layers\.1\.mlp\.gate\.weight"):
        HFRouterPrefix(bad, layer=1)  # layer L's gate, in transformers' load report
    with pytest.raises(GrouterError, match=r"shape mismatch for model\.layers\.1\.mlp\.experts\..*\(8, .*\(6, "):
        HFRouterPrefix(bad, layer=2)  # found by transformers loading layer 1


def test_token_ids_outside_vocabulary(qwen2):
    prefix = HFRouterPrefix(qwen2)
    with pytest.raises(GrouterError, match="outside the source model's vocabulary"):
        prefix.router_logits(torch.tensor([[1, 2, VOCAB]]))


def test_tokenizer_vocabulary(qwen2, tmp_path):
    assert load_hf_tokenizer_vocab(qwen2) is None
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_hf_tokenizer_vocab(tmp_path) == {"<unk>": 0, "hello": 1, "world": 2, "<eos>": 3}
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(GrouterError, match="tokenizer file .* is corrupt"):
        load_hf_tokenizer_vocab(tmp_path)


def test_check_tokenizer(qwen2, tiny_data, tmp_path):
    """A dataset is accepted with the source's own tokenizer and refused with another one."""
    d = tmp_path / "model"
    shutil.copytree(qwen2, d)
    prefix = HFRouterPrefix(d, layer=1)
    prefix.check_tokenizer(tiny_data)  # no tokenizer.json: nothing to check
    tiny_data.tokenizer().save(str(d / "tokenizer.json"))
    prefix.check_tokenizer(tiny_data)
    other = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    other.save(str(d / "tokenizer.json"))
    with pytest.raises(GrouterError, match="another tokenizer") as err:
        prefix.check_tokenizer(tiny_data)
    assert "\n" not in str(err.value)
    assert f"grouter data tokenize --tokenizer {d}" in str(err.value)


def test_score_function_and_stray_gate_bias(qwen2, tmp_path):
    """Raw logits are softmax scores. A gate bias on disk that the model's gate does not have (so its
    forward ignores it) is refused rather than added; real gate biases: GPT-OSS in test_hf_architectures."""
    plain = HFRouterPrefix(qwen2, layer=2)
    assert (plain.score_function, plain.includes_bias) == ("softmax", False)
    assert plain.describe()["scores"] == "H @ W^T" and plain.describe()["selection"] == "topk"
    d = tmp_path / "model"
    shutil.copytree(qwen2, d)
    save_file({"model.layers.2.mlp.gate.bias": torch.randn(8)}, str(d / "bias.safetensors"), metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.2.mlp.gate.bias"] = "bias.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GrouterError, match="gate bias 'model.layers.2.mlp.gate.bias' is in the checkpoint but .* has none") as err:
        HFRouterPrefix(d, layer=2)
    assert "\n" not in str(err.value)
