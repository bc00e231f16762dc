"""Each megatron-core release boundary the adapter handles (grouter.integrations.megatron.compat), checked on
both sides: 0.16.1 (the `megatron` extra on Python 3.11, in this process) and 0.17.1, 0.18.2, 0.19.2 (the
releases `make install` puts beside it, one spawned process each, the release first on sys.path).

For every release the same probe builds Megatron's GPTModel with an MTP layer through grouter_gpt_model and
records what the release did: how MoELayer built the routers (``is_mtp_layer`` from 0.17), the form of the
MoE spec (a partial from 0.18), get_batch_on_this_cp_rank's signature (``is_hybrid_cp`` from 0.18), and, for
releases with megatron.training (0.17+), which pretrain() signature the entry point's call binds to (0.18+:
a config container first; 0.19: the model provider as a keyword). It also checks that the first MoE layer
computes, with the served routing, the weighted sum of its experts' outputs, and that with per-layer heads the
MTP layer serves the last decoder layer's head (0.17+ numbers MTP layers from 1 again; is_mtp_layer tells).
"""

import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from grouter.device import spawn
from grouter.testing import MEGATRON_RELEASES, megatron_release, synthetic_store

E, K, SEQ = 8, 2, 32


def _model_probe(data, store) -> dict:
    """Build a 2-layer GPTModel with one MTP layer and Grouter routing; run one batch; what the release did."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank

    from grouter.integrations.megatron import GrouterGPTDataset, GrouterRouter, RoutingFeed, grouter_gpt_model
    from grouter.integrations.megatron.compat import cp_split, megatron_version
    from grouter.routers import Heads

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                               moe_ffn_hidden_size=32, num_moe_experts=E, moe_router_topk=K, moe_aux_loss_coeff=0.0,
                               moe_token_dispatcher_type="alltoall", hidden_dropout=0.0, attention_dropout=0.0,
                               add_bias_linear=False, use_cpu_initialization=True, mtp_num_layers=1)
    feed = RoutingFeed.from_store(store)
    torch.manual_seed(0)
    model = grouter_gpt_model(config, feed, 512, SEQ)
    routers = [m for m in model.modules() if isinstance(m, GrouterRouter)]
    batch = torch.utils.data.default_collate([GrouterGPTDataset(data, store, create_attention_mask=True)[i]
                                              for i in (0, 1)])
    batch = cp_split(batch)  # CP size 1: the batch unchanged, whatever the release's signature
    layer, served = model.decoder.layers[0].mlp, []
    layer.register_forward_hook(lambda mod, args, out: served.append((args[0].detach(), out[0].detach())))
    feed.push(batch)
    model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]).sum().backward()
    feed.check_drained()
    x, out = served[0]
    flat = x.reshape(-1, x.shape[-1])
    gates = torch.zeros(len(flat), E).scatter_(1, batch["routing_ids"].transpose(0, 1).reshape(-1, K),
                                               batch["routing_weights"].transpose(0, 1).reshape(-1, K))
    manual = sum(gates[:, e:e + 1] * F.linear(config.activation_func(F.linear(flat, ex.linear_fc1.weight)),
                                              ex.linear_fc2.weight) for e, ex in enumerate(layer.experts.local_experts))
    mlp = get_gpt_decoder_block_spec(config, False).layer_specs[0].submodules.mlp
    feed.heads = Heads((0, 1), 2)  # per-layer routing: which head each router would serve
    return {"version": megatron_version(), "routers": [[r.layer_number, r.is_mtp_layer] for r in routers],
            "heads": [r.head for r in routers],
            "moe_spec": type(mlp).__name__, "manual_error": float((out.reshape(-1, x.shape[-1]) - manual).abs().max()),
            "cp_split_is_hybrid": "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters}


def _trainer_probe(data_path: str, store_path: str) -> dict:
    """The entry point's call of pretrain() bound to this release's signature (pretrain itself replaced by
    the binding): which of its parameters received grouter's providers."""
    from megatron import training

    from grouter.integrations.megatron import pretrain
    from grouter.integrations.megatron.compat import prebuilt_dataset_helpers

    real, bound = training.pretrain, {}

    def binding(*args, **kwargs):
        arguments = inspect.signature(real).bind(*args, **kwargs).arguments
        ours = {pretrain.model_provider: "model", pretrain.datasets_provider: "datasets",
                pretrain.forward_step: "forward_step", pretrain.add_grouter_args: "extra_args"}
        bound.update({name: ours[v] for name, v in arguments.items() if callable(v) and v in ours})
        bound["first"] = next(iter(arguments))

    training.pretrain = binding
    argv = ["--grouter-data", data_path, "--grouter-routing", store_path, "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "2", "--num-experts", str(E), "--micro-batch-size", "2", "--train-iters", "1",
            "--eval-interval", "1", "--use-cpu-initialization", "--transformer-impl", "local"]
    try:
        pretrain.main(argv)
    finally:
        training.pretrain = real
    return {"pretrain": bound, "prebuilt_helpers": prebuilt_dataset_helpers()}


def _release_probe(rank: int, world: int, release: str | None, data_path: str, store_path: str, out: str) -> None:
    """A spawned process: the probes under ``release`` (a pip --target directory; None: this .venv's)."""
    if release:
        sys.path.insert(0, release)
    import pytest as _pytest  # the MonkeyPatch of the CPU stubs, undone before the trainer's stand-ins
    from megatron.core import parallel_state

    from grouter.formats.dataset import PackedDataset
    from grouter.formats.store import RoutingStore
    from grouter.integrations.megatron.cpu import cpu_stubs, trainer_on_cpu

    data = PackedDataset.open(data_path)
    store = RoutingStore.open(store_path, data=data)
    with _pytest.MonkeyPatch.context() as mp:
        cpu_stubs(mp.setattr)
        parallel_state.initialize_model_parallel()
        found = _model_probe(data, store)
        parallel_state.destroy_model_parallel()
    trainer_on_cpu()
    found.update(_trainer_probe(data_path, store_path))
    Path(out).write_text(json.dumps(found))


def expected(version: tuple[int, int]) -> dict:
    """What compat.py says each boundary is, for a release ``version``."""
    from_18 = version >= (0, 18)
    from_17 = version >= (0, 17)  # the MTP layer: flagged, and numbered from 1 again
    return {"routers": [[1, False], [2, False], [1, True] if from_17 else [3, False]], "heads": [0, 1, 1],
            "moe_spec": "partial" if from_18 else "ModuleSpec", "cp_split_is_hybrid": from_18,
            "pretrain": ({"first": "cfg_container", "model_provider": "model",
                          "train_valid_test_dataset_provider": "datasets", "forward_step_func": "forward_step"}
                         if from_18 else
                         {"first": "train_valid_test_dataset_provider", "train_valid_test_dataset_provider": "datasets",
                          "model_provider": "model", "forward_step_func": "forward_step",
                          "extra_args_provider": "extra_args"})}


@pytest.fixture(scope="module")
def routing_store(tiny_data, tmp_path_factory):
    path = synthetic_store(tiny_data, tmp_path_factory.mktemp("versions") / "store", E, K, clusters=4, seed=0)
    return SimpleNamespace(data=tiny_data, path=path)


@pytest.mark.slow
@pytest.mark.parametrize("version", MEGATRON_RELEASES)
def test_release_boundaries(version, routing_store, tmp_path):
    from grouter.integrations.megatron.compat import version_tuple

    out = tmp_path / "probe.json"
    spawn(1, _release_probe, (str(megatron_release(version)), str(routing_store.data.path), str(routing_store.path),
                              str(out)))
    found = json.loads(out.read_text())
    assert found["version"].split("+")[0] == version  # Megatron appends the git commit of the working directory
    want = expected(version_tuple(version))
    assert {key: found[key] for key in want} == want
    assert found["manual_error"] < 1e-5 and found["prebuilt_helpers"]


def test_oldest_release_in_this_process(megatron_cpu, routing_store):
    """0.16.1 (this .venv's): routers built without is_mtp_layer, a ModuleSpec MoE spec, the two-argument
    get_batch_on_this_cp_rank; its trainer boundary (no megatron.training) is test_integration_megatron's."""
    from grouter.formats.store import RoutingStore
    from grouter.integrations.megatron.compat import version_tuple

    found = _model_probe(routing_store.data, RoutingStore.open(routing_store.path, data=routing_store.data))
    assert version_tuple(found["version"]) == (0, 16)
    want = expected((0, 16))
    keys = ("routers", "heads", "moe_spec", "cp_split_is_hybrid")
    assert {key: found[key] for key in keys} == {key: want[key] for key in keys}
    assert found["manual_error"] < 1e-5

