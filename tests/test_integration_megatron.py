"""grouter.integrations.megatron: Megatron-core MoE layers driven by stored or online Grouter routing.

Megatron-core runs here on the CPU (one gloo process, or gloo process groups of 2 ranks), with the
few CUDA calls it makes unconditionally replaced by ``grouter.integrations.megatron.cpu.cpu_stubs``
(each stub names the Megatron line it stands in for). Models are tiny: hidden 32, 2 layers, 8 experts
top-2, 32-token sequences of
``tiny_data``. The CUDA/NCCL variants at the end skip without GPUs.
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="megatron-core is an optional extra: pip install grouter[megatron]")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron's import-time notices: no Apex / Transformer Engine here
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
    from megatron.core.transformer.transformer_config import TransformerConfig
    from grouter.integrations.megatron.compat import cp_split

    from grouter.integrations.megatron import (GrouterGPTDataset, GrouterRouter, RankLayout, RoutingFeed,
                                               grouter_gpt_model, plan_data_loader, plan_order,
                                               with_grouter_router)
    from grouter.integrations.megatron.cpu import cpu_stubs
from torch.utils.data import DataLoader, default_collate  # noqa: E402

from grouter.device import free_port, spawn  # noqa: E402
from grouter.errors import GrouterError  # noqa: E402
from grouter.formats.grouter import GrouterConfig  # noqa: E402
from grouter.formats.plan import Plan, relabel  # noqa: E402
from grouter.formats.store import RoutingStore  # noqa: E402
from grouter.integrations.megatron.arguments import (_REFUSED_ARGS, check_args, check_sources,  # noqa: E402
                                                     refuse_early)
from grouter.integrations.megatron.router import _with_router  # noqa: E402
from grouter.network import Grouter  # noqa: E402
from grouter.place import Options as PlaceOptions, plan_placement  # noqa: E402
from grouter.routers import Routing  # noqa: E402
from grouter.testing import synthetic_store  # noqa: E402

# Megatron's own deprecation notices (e.g. "tp_group is None") and torch's for the collectives it calls.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
              pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")]
ROOT = Path(__file__).resolve().parents[1]
E, K, HIDDEN, SEQ = 8, 2, 32, 32


def init_megatron(world: int = 1, **parallel) -> None:
    """Megatron's parallel state on the current gloo group (a one-process group when none exists)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=world)
    parallel_state.initialize_model_parallel(**parallel)


@pytest.fixture(scope="module")
def store(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    synthetic_store(tiny_data, root / "store", E, K, clusters=4, seed=0, noise=0.1, decay=0.7)
    return RoutingStore.open(root / "store", data=tiny_data)


@pytest.fixture(scope="module")
def plan2(store):
    return plan_placement(store, PlaceOptions(ranks=2, global_batch=8, clusters=16, seed=0))


def config(**overrides) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=64, moe_ffn_hidden_size=32,
                num_moe_experts=E, moe_router_topk=K, moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall",
                hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, use_cpu_initialization=True)
    return TransformerConfig(**{**base, **overrides})


def build(feed: RoutingFeed, vocab: int = 512, **overrides):
    torch.manual_seed(0)
    return grouter_gpt_model(config(**overrides), feed, vocab, SEQ)


def moe_submodules(spec) -> list:
    """The MoESubmodules of a spec (the adapter's own walk over ModuleSpecs, dataclasses and partials)."""
    found: list = []
    _with_router(spec, None, found)
    return found


def routers(model) -> list[GrouterRouter]:
    return [m for m in model.modules() if isinstance(m, GrouterRouter)]


def dense(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[b, L, k]`` routing -> ``[L·b, E]`` gate weights in Megatron's token order (sequence-major)."""
    ids, weights = (t.transpose(0, 1).reshape(-1, K) for t in (ids, weights))
    return torch.zeros(len(ids), E).scatter_(1, ids.long(), weights.float())


def lm_loss(model, batch) -> torch.Tensor:
    per_token = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def scheduled_grads(model, feed: RoutingFeed, batches: list[dict], schedule: str) -> list[torch.Tensor]:
    """Run forwards and backwards in ``schedule`` order ("F0F1B0B1": forward of batch 0, ..., backward of
    batch 1), pushing each batch before its forward; the parameters' gradients."""
    losses = {}
    for op, i in zip(schedule[::2], map(int, schedule[1::2])):
        if op == "F":
            feed.push(batches[i])
            losses[i] = lm_loss(model, batches[i])
        else:
            losses[i].backward()
    feed.check_drained()
    return [p.grad for p in model.parameters()]


class Recorder:
    """The probs every GrouterRouter of a model serves, in call order."""

    def __init__(self, model):
        self.served: list[torch.Tensor] = []
        for r in routers(model):
            r.register_forward_hook(lambda mod, args, out: self.served.append(out[0].detach().clone()))


# -- the router: output, gradient, no parameters ---------------------------------------------------------
def test_moe_layer_equals_manual_computation(megatron_cpu, store):
    """Output and input gradient of Megatron's MoELayer with our router == sum over a token's k experts of
    weight x expert_mlp(x), computed from the layer's own expert weights."""
    feed = RoutingFeed.from_store(store)
    layer = build(feed).decoder.layers[0].mlp
    routing = store.routing("train", [3, 5])
    x = torch.randn(SEQ, 2, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)  # [s, b, h]
    feed.push(routing)
    out, bias = layer(x)
    assert bias is None
    grad = torch.randn_like(out)
    out.backward(grad)

    x_ref = x.detach().clone().requires_grad_(True)
    flat, gates = x_ref.reshape(-1, HIDDEN), dense(routing.ids, routing.weights)
    ref = torch.zeros_like(flat)
    for e, expert in enumerate(layer.experts.local_experts):
        hidden = layer.config.activation_func(F.linear(flat, expert.linear_fc1.weight))
        ref = ref + gates[:, e:e + 1] * F.linear(hidden, expert.linear_fc2.weight)
    ref.view_as(out).backward(grad)
    torch.testing.assert_close(out, ref.view_as(out), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(GrouterError, match=r"left unused .*\(2, 1, 0\)"):  # layer 2 never ran
        feed.check_drained()


def test_router_has_no_parameters_and_gets_no_gradient(megatron_cpu, store, tiny_data):
    feed = RoutingFeed.from_store(store)
    model = build(feed)
    assert len(routers(model)) == 2 and all(not list(r.parameters()) and not list(r.buffers()) for r in routers(model))
    assert not [n for n, _ in model.named_parameters() if "router" in n]
    assert not [k for k in model.state_dict() if "router" in k]
    recorder = Recorder(model)
    batch = default_collate([GrouterGPTDataset(tiny_data, store, create_attention_mask=True)[i] for i in (0, 1)])
    feed.push(batch)
    lm_loss(model, batch).backward()
    assert all(not p.requires_grad and p.grad_fn is None for p in recorder.served)  # probs carry no graph
    used = set(batch["routing_ids"].unique().tolist())
    for layer in model.decoder.layers:
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            g = expert.linear_fc1.weight.grad
            assert (g is not None and bool(g.abs().sum() > 0)) == (e in used)  # exactly the routed experts learn


# -- training a GPTModel, and the routing each micro-batch is served -------------------------------------
def test_gpt_model_trains_with_stored_routing(megatron_cpu, store, tiny_data):
    """A whole GPTModel trains on shuffled batches; each micro-batch is served exactly its sequences' routing."""
    feed = RoutingFeed.from_store(store)
    model = build(feed, vocab=tiny_data.vocab_size)
    recorder = Recorder(model)
    dataset = GrouterGPTDataset(tiny_data, store, create_attention_mask=True)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(3))[:8 * 12].tolist()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for step, batch in enumerate(DataLoader(dataset, batch_size=8, sampler=order)):
        idx = order[8 * step:8 * (step + 1)]
        feed.push(batch)
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        feed.check_drained()
        losses.append(loss.item())
        expected = store.routing("train", idx)
        for served in recorder.served[-2:]:  # both MoE layers, this micro-batch
            torch.testing.assert_close(served, dense(expected.ids, expected.weights), rtol=0, atol=0)
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses


@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=1),
                                       dict(recompute_granularity="selective", recompute_modules=["moe"])],
                         ids=["full", "selective-moe"])
def test_activation_recompute_replays_the_same_routing(megatron_cpu, store, tiny_data, recompute):
    """Two checkpointed forwards, then both backwards (the order of a 1F1B pipeline): the recomputes take
    the routing of their own micro-batch, so gradients equal those of plain forward/backward pairs."""
    dataset = GrouterGPTDataset(tiny_data, store, create_attention_mask=True)
    batches = [default_collate([dataset[i] for i in idx]) for idx in ([0, 1], [2, 3])]

    def grads(schedule: str, **overrides) -> list[torch.Tensor]:
        feed = RoutingFeed.from_store(store)
        return scheduled_grads(build(feed, vocab=tiny_data.vocab_size, **overrides), feed, batches, schedule)

    for got, ref in zip(grads("F0F1B0B1", **recompute), grads("F0B0F1B1")):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _served_under_plan(rank: int, world: int, data, store, plan: Plan) -> list[bool]:
    """The plan's first two global batches on this rank (2 micro-batches each): is each micro-batch served
    exactly RoutingStore.routing of its sequences, relabelled by the plan?"""
    feed = RoutingFeed.from_store(store, plan)
    model = build(feed, vocab=data.vocab_size, expert_model_parallel_size=world)
    assert model.decoder.layers[0].mlp.local_expert_indices == list(range(E // world * rank, E // world * (rank + 1)))
    recorder, mine = Recorder(model), np.concatenate(plan.samples[rank][:2])
    loader = plan_data_loader(GrouterGPTDataset(data, store, create_attention_mask=True), plan, rank, world, 2)
    same = []
    for step, batch in zip(range(4), loader):
        feed.push(batch)
        lm_loss(model, batch).backward()
        feed.check_drained()
        expected = store.routing("train", mine[2 * step:2 * step + 2])
        want = dense(relabel(expected.ids, plan.permutation), expected.weights)
        same += [torch.equal(served, want) for served in recorder.served[-2:]]
    return same


def _expert_parallel_rank(rank: int, world: int, data_path: str, store_path: str, plan: Plan, out: str,
                          served: bool = True) -> None:
    """One gloo rank of Megatron expert parallelism (EP = DP = world): the all-to-all bytes of
    grouter.integrations.megatron.measure (plan and random placement) with their prediction, and (``served``)
    whether each micro-batch was served the plan's routing."""
    from grouter.integrations.megatron import measure
    from grouter.formats.dataset import PackedDataset

    cpu_stubs(setattr)
    init_megatron(expert_model_parallel_size=world)
    data = PackedDataset.open(data_path)
    store = RoutingStore.open(store_path, data=data, verify=False)
    job = dict(world=world, steps=2, layers=2, hidden=HIDDEN, cuda=False)
    records = [r for p in ("plan", "random") for r in measure.run_placement(rank, job, p, data, store, plan)]
    result = {"served_equal": _served_under_plan(rank, world, data, store, plan) if served else None, "bytes": records}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def ep2(store, plan2, tiny_data, tmp_path_factory):
    """One spawn of 2 gloo ranks; each writes what it saw (rank{r}.json)."""
    out = tmp_path_factory.mktemp("ep2")
    spawn(2, _expert_parallel_rank, (str(tiny_data.path), str(store.path), plan2, str(out)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_data_parallel_ranks_are_served_the_plans_sequences(ep2):
    """Under EP = DP = 2 with Megatron's alltoall dispatcher, every micro-batch a rank runs is served exactly
    RoutingStore.routing of the sequences the plan gives that rank (shuffled global batches), relabelled."""
    assert [len(r["served_equal"]) for r in ep2] == [8, 8]  # 4 micro-batches x 2 MoE layers per rank
    assert all(all(r["served_equal"]) for r in ep2)


def test_alltoall_dispatcher_bytes_equal_the_megatron_cost_model(ep2):
    """Bytes Megatron's MoEAlltoAllTokenDispatcher sends to the other rank (hidden states, float32) ==
    grouter.place.remote_volume's megatron count x layers x hidden x 4, per rank and step; the results come
    back the same way (combine), gradients retrace both, and the plan sends less than random placement."""
    records = [rec for r in ep2 for rec in r["bytes"]]
    assert len(records) == 2 * 2 * 2  # ranks x placements x steps
    for rec in records:
        m = rec["measured"]
        assert m["dispatch"] == rec["predicted_dispatch"] > 0
        assert m["dispatch_probs"] * HIDDEN == m["dispatch"]  # one float32 gate weight per hidden row
        assert m["backward"] == m["dispatch"] + m["combine"] and m["backward_probs"] == 0
        other = next(o for o in records if (o["placement"], o["step"], o["rank"]) ==
                     (rec["placement"], rec["step"], 1 - rec["rank"]))
        assert m["combine"] == other["measured"]["dispatch"]  # results return along the dispatch route
    total = {p: sum(r["measured"]["dispatch"] for r in records if r["placement"] == p) for p in ("plan", "random")}
    assert total["plan"] < 0.8 * total["random"], total


@pytest.mark.slow
def test_per_layer_alltoall_bytes_equal_each_layers_own_count(tiny_data, tmp_path):
    """A per-layer store (heads of source layers 0 and 1, each its own routing): the bytes Megatron's
    dispatcher sends equal the sum over the 2 layers of remote_volume of each layer's own head, per rank and
    step (benchmarks/megatron_bytes.py refuses any run where they differ)."""
    from grouter.ep import rank_batches
    from grouter.place import remote_volume
    from grouter.routers import Heads

    synthetic_store(tiny_data, tmp_path / "heads", E, K, clusters=4, seed=0, noise=0.1, decay=0.7, heads=Heads((0, 1), 2))
    store = RoutingStore.open(tmp_path / "heads", data=tiny_data)
    plan = plan_placement(store, PlaceOptions(ranks=2, global_batch=8, clusters=16, seed=0))
    spawn(2, _expert_parallel_rank, (str(tiny_data.path), str(store.path), plan, str(tmp_path), False))
    records = [rec for r in range(2) for rec in json.loads((tmp_path / f"rank{r}.json").read_text())["bytes"]]
    assert len(records) == 8 and all(rec["measured"]["dispatch"] == rec["predicted_dispatch"] > 0 for rec in records)
    ids = store.ids("train")
    batches = rank_batches(plan, "plan", 2)
    for rec in (r for r in records if r["placement"] == "plan"):
        idx = np.sort(batches[rec["step"]][rec["rank"]])
        per_head = [remote_volume(ids[idx][:, :, h], plan.rank_of_expert, np.full(len(idx), rec["rank"]))["megatron"]
                    for h in range(2)]
        assert rec["predicted_dispatch"] == sum(per_head) * HIDDEN * 4 and per_head[0] != per_head[1]


# -- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (dict(num_moe_experts=16), "num_moe_experts is 16 but the routing has 8 experts; set num_moe_experts=8"),
    (dict(moe_router_topk=4), "moe_router_topk is 4 but the routing has k=2"),
    (dict(moe_aux_loss_coeff=0.01), "moe_aux_loss_coeff=0.01 does not go with Grouter routing"),
    (dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[0.0, 1e-3]),
     "moe_aux_loss_coeff"),
    (dict(moe_z_loss_coeff=1e-3), "moe_z_loss_coeff"),
    (dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid"), "expert bias"),
    (dict(moe_expert_capacity_factor=1.0), "moe_expert_capacity_factor"),
    (dict(moe_input_jitter_eps=0.01), "moe_input_jitter_eps"),
    (dict(moe_enable_routing_replay=True), "moe_enable_routing_replay=True .* the ids-only ReplayFeed"),
    (dict(cuda_graph_impl="local"), "cuda_graph_impl='local' .* replay one micro-batch's routing for every later"),
    (dict(enable_cuda_graph=True), "cuda_graph_impl='local'"),  # Megatron turns the old flag into the new
])
def test_config_that_disagrees_with_the_routing_is_refused(megatron_cpu, store, overrides, match):
    feed = RoutingFeed.from_store(store)
    with pytest.raises(GrouterError, match=match) as err:
        build(feed, **overrides)
    assert "\n" not in str(err.value)
    assert not feed.routers


def test_feed_refuses_bad_use(megatron_cpu, store, plan2):
    feed = RoutingFeed.from_store(store)
    model = build(feed)
    x = torch.randn(SEQ, 2, HIDDEN)
    with pytest.raises(GrouterError, match="no routing for this micro-batch at MoE layer 1: call RoutingFeed.push"):
        model.decoder.layers[0].mlp(x)
    feed.push(store.routing("train", [0, 1, 2]))  # 3 sequences, the layer runs 2
    with pytest.raises(GrouterError, match=r"pushed .* is \[3, 32\] .* runs 2 sequences of 32 positions"):
        model.decoder.layers[0].mlp(x)
    feed.clear()
    bad = store.routing("train", [0, 1])
    for ids, match in ((bad.ids + E, "outside 0..7"), (bad.ids[..., :1].expand(-1, -1, 2), "expert twice"),
                       (bad.ids[..., :1], r"\[b, L, k=2\]")):
        with pytest.raises(GrouterError, match=match):
            feed.push(Routing(ids, bad.weights[..., :ids.shape[-1]]))
    with pytest.raises(GrouterError, match="no routing_ids"):
        feed.push({"tokens": torch.zeros(2, SEQ, dtype=torch.long)})
    with pytest.raises(GrouterError, match="the plan is for 8 experts top-2 but the routing has 16 top-2"):
        RoutingFeed.from_store(SimpleNamespace(n_experts=16, k=2), plan2)
    with pytest.raises(GrouterError, match="no MoE layer"):
        with_grouter_router([], config(), feed)
    assert RoutingFeed.of(model) is feed


# -- the entry point's arguments: one-line refusals -------------------------------------------------------
def megatron_args(**overrides) -> SimpleNamespace:
    """The Megatron arguments check_args reads, as parse_args leaves them for a plain MoE run."""
    base = dict(grouter_data="d", grouter_routing="s", grouter_online=None, num_experts=E, seq_length=SEQ,
                padded_vocab_size=512, expert_model_parallel_size=2, context_parallel_size=1,
                tensor_model_parallel_size=1, expert_tensor_parallel_size=1, micro_batch_size=2, global_batch_size=8,
                rampup_batch_size=None, dataloader_type="single")
    return SimpleNamespace(**{**{name: None for name, _ in _REFUSED_ARGS}, **base, **overrides})


@pytest.mark.parametrize("overrides,dp,match", [
    (dict(mock_data=True), 2, "--mock-data is not supported .* the tokens come from --grouter-data or from --data-path"),
    (dict(dataloader_inter_document_masking=True), 2, "--dataloader-inter-document-masking is not supported"),
    (dict(use_legacy_models=True), 2, "--use-legacy-models is not supported"),
    (dict(sft=True), 2, "--sft is not supported"),
    (dict(num_experts=None), 2, "has no MoE layer: pass --num-experts"),
    (dict(seq_length=64), 2, "--seq-length 64 differs from the dataset's 32-token sequences"),
    (dict(padded_vocab_size=128), 2, r"vocabulary \(\d+\) exceeds the model's \(128\)"),
    (dict(expert_model_parallel_size=4), 4, "plan is for 2 expert-parallel ranks but --expert-model-parallel-size "
                                            "is 4; make it with grouter place --ranks 4"),
    (dict(context_parallel_size=2), 2, "context parallelism, .* the plan would be approximate"),
    (dict(tensor_model_parallel_size=2), 2, "expert tensor-parallel size other than the tensor-parallel size"),
    (dict(), 3, "the plan is for 2 data-parallel ranks but world_size is 3"),
    (dict(global_batch_size=8), 4, r"--global-batch-size must be the plan's 8 x 2 expert-parallel group\(s\) = 16"),
    (dict(dataloader_type="cyclic"), 2, "--dataloader-type cyclic would reorder the plan's samples"),
])
def test_entry_point_refuses_in_one_line(store, tiny_data, plan2, overrides, dp, match):
    """What the entry point cannot run as asked is refused before Megatron builds anything; with EP = 2 and
    DP = 4 (EP < DP) and the global batch of two plan batches, the plan is accepted (and dealt exactly)."""
    run = SimpleNamespace(data=tiny_data, plan=plan2)
    with pytest.raises(GrouterError, match=match) as err:
        check_args(megatron_args(**overrides), run, dp)
    assert "\n" not in str(err.value)
    check_args(megatron_args(global_batch_size=16), run, 4)
    for sources in (dict(grouter_routing=None), dict(grouter_online="g"), dict(grouter_data=None)):
        with pytest.raises(GrouterError, match="give --grouter-data DIR and one of --grouter-routing"):
            check_sources(megatron_args(**sources))
    with pytest.raises(GrouterError, match="--grouter-replay replays stored expert ids: give --grouter-routing"):
        check_sources(megatron_args(grouter_routing=None, grouter_online="g", grouter_replay=True))
    for flags in (["--cuda-graph-impl", "local"], ["--enable-cuda-graph"], ["--external-cuda-graph"]):
        with pytest.raises(GrouterError, match="CUDA graphs are not supported with Grouter routing"):
            refuse_early(["--num-layers", "2", *flags])
    refuse_early(["--cuda-graph-impl", "none"])


def test_entry_point_needs_megatrons_trainer(megatron_cpu):
    """megatron-core 0.16 has no megatron.training (it ships in the wheel from 0.17): a one-line hint, not a
    traceback into Megatron (this suite's .venv has 0.16.1; test_megatron_pretrain runs the newest release)."""
    from grouter.integrations.megatron.compat import TRAINER_IN_WHEEL, version_tuple

    if version_tuple() >= TRAINER_IN_WHEEL:
        pytest.fail("this test checks the 0.16 boundary; .venv should hold megatron-core 0.16 (make install)")
    sys.modules.pop("grouter.integrations.megatron.pretrain", None)
    with pytest.raises(GrouterError, match=r"megatron-core 0\.16\.\d+ has no megatron.training \(it ships from "
                                           r"0\.17\): put a Megatron-LM checkout") as err:
        importlib.import_module("grouter.integrations.megatron.pretrain")
    assert "\n" not in str(err.value)


# -- tokens local to a rank: sequence and context parallelism --------------------------------------------
class FakeGroup:
    """The size and rank of a process group: all that Megatron's slicing functions read from one."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _size_and_rank_of_fakes(monkeypatch) -> None:
    """torch.distributed's size and rank of a group answer for FakeGroups too (megatron-core 0.18+ asks them)."""
    for name, method in (("get_world_size", "size"), ("get_rank", "rank")):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda group=None, real=real, method=method: getattr(group, method)()
                            if isinstance(group, FakeGroup) else real(group))


def megatrons_tokens(x: torch.Tensor, tp: FakeGroup, cp: FakeGroup, sequence_parallel: bool) -> tuple:
    """What Megatron gives a rank of ``x [b, L, k]``: its CP split of the batch (get_batch_on_this_cp_rank),
    then, as hidden states ``[s, b, ...]``, the SP scatter (scatter_to_sequence_parallel_region), flattened."""
    with pytest.MonkeyPatch.context() as mp:
        _size_and_rank_of_fakes(mp)
        cp_part = cp_split({"routing_ids": x.clone()}, cp_group=cp)["routing_ids"]
        sb = cp_part.transpose(0, 1).contiguous()
        if sequence_parallel:
            sb = scatter_to_sequence_parallel_region(sb, group=tp)
    return cp_part, sb.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("tp_size,sequence_parallel", [(1, False), (2, True), (4, True), (2, False)])
def test_rank_layout_gives_each_rank_megatrons_tokens(megatron_cpu, cp_size, tp_size, sequence_parallel):
    x = torch.arange(3 * SEQ * K).view(3, SEQ, K)  # every entry distinct
    for cp_rank in range(cp_size):
        for tp_rank in range(tp_size):
            layout = RankLayout(tp_size, tp_rank, cp_size, cp_rank, sequence_parallel)
            cp_part, theirs = megatrons_tokens(x, FakeGroup(tp_size, tp_rank), FakeGroup(cp_size, cp_rank),
                                               sequence_parallel)
            assert torch.equal(layout.local_tokens(x), theirs)
            assert torch.equal(layout.local_tokens(cp_part, cp_split=True), theirs)


def test_router_serves_the_rank_its_tokens_under_sp_and_cp(megatron_cpu, store):
    """TP 2 with sequence parallelism and CP 2: the router of TP rank 1, CP rank 1 serves exactly Megatron's
    share of the routing, whether the feed got full sequences or Megatron's CP split of them."""
    tp, cp = FakeGroup(2, 1), FakeGroup(2, 1)
    cfg = config(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2)
    feed = RoutingFeed.from_store(store)
    router = GrouterRouter(cfg, SimpleNamespace(tp=tp, cp=cp), feed=feed)
    routing = store.routing("train", [0, 1, 2])
    hidden = torch.zeros(SEQ // 4, 3, HIDDEN)  # [s / (tp·cp), b, h]
    (cp_ids, want_ids), (cp_w, want_w) = (megatrons_tokens(t, tp, cp, True) for t in (routing.ids, routing.weights))
    want = torch.zeros(len(want_ids), E).scatter_(1, want_ids, want_w)
    for pushed in (routing, Routing(cp_ids, cp_w)):
        feed.push(pushed)
        probs, routing_map = router(hidden)
        torch.testing.assert_close(probs, want, rtol=0, atol=0)
        assert torch.equal(routing_map, want > 0) and routing_map.sum(1).eq(K).all()


# -- MTP, Transformer Engine specs, online routing -------------------------------------------------------
def test_mtp_layers_take_the_routing_too(megatron_cpu, store, tiny_data):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec

    feed = RoutingFeed.from_store(store)
    model = build(feed, vocab=tiny_data.vocab_size, mtp_num_layers=1)
    names = [n for n, m in model.named_modules() if isinstance(m, GrouterRouter)]
    assert len(names) == 3 and sum(n.startswith("mtp.") for n in names) == 1
    batch = default_collate([GrouterGPTDataset(tiny_data, store, create_attention_mask=True)[i] for i in (0, 1)])
    feed.push(batch)
    lm_loss(model, batch).backward()
    feed.check_drained()  # the MTP layer consumed its copy of the micro-batch's routing

    plain = get_gpt_mtp_block_spec(config(mtp_num_layers=1), get_gpt_layer_local_spec(num_experts=E), False)
    ours = with_grouter_router(plain, config(mtp_num_layers=1), feed)
    (moe,), (before,) = moe_submodules(ours), moe_submodules(plain)  # wherever the release nests them
    assert moe.router.func is GrouterRouter and moe.router.keywords["feed"] is feed
    assert before.router is not moe.router


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine is not installed (it needs CUDA); its layer spec cannot be built")
def test_transformer_engine_layer_spec_gets_the_router(store):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    feed = RoutingFeed.from_store(store)
    spec = with_grouter_router(get_gpt_layer_with_transformer_engine_spec(num_experts=E, moe_grouped_gemm=True),
                               config(), feed)
    assert spec.submodules.mlp.submodules.router.func is GrouterRouter


def test_online_grouter_routes_each_micro_batch_once(megatron_cpu, store, tiny_data, plan2):
    grouter = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=E, top_k=K, d_model=32, n_layers=1,
                                    n_heads=2, d_ff=64, max_seq_len=SEQ))
    calls = []
    grouter.register_forward_hook(lambda *_: calls.append(1))
    feed = RoutingFeed.online(grouter, plan=plan2)
    model = build(feed, vocab=tiny_data.vocab_size)
    recorder = Recorder(model)
    dataset = GrouterGPTDataset(tiny_data, create_attention_mask=True)  # no store: no routing in the batch
    batch = default_collate([dataset[i] for i in (4, 9)])
    assert "routing_ids" not in batch
    feed.push(batch)
    lm_loss(model, batch).backward()
    expected = grouter.route(batch["tokens"])
    want = dense(relabel(expected.ids, plan2.permutation), expected.weights)
    assert len(calls) == 2 and len(recorder.served) == 2  # one routing (plus ours above) for both layers
    assert all(torch.equal(served, want) for served in recorder.served)
    assert all(p.grad is None and not p.requires_grad for p in grouter.parameters())


# -- data: GPTDataset-style items in the store's order, the plan's sample placement -----------------------
def test_dataset_items_are_the_stores_sequences_in_order(store, tiny_data):
    dataset = GrouterGPTDataset(tiny_data, store, create_attention_mask=True, eod_mask_loss=True)
    assert len(dataset) == store.n_sequences("train") == len(tiny_data.split("train"))
    for i in (0, 7, len(dataset) - 1):
        item, raw = dataset[i], tiny_data.split("train").batch([i])
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask", "routing_ids",
                             "routing_weights"}
        assert torch.equal(item["tokens"], raw["input_ids"][0]) and torch.equal(item["labels"], raw["labels"][0])
        assert torch.equal(item["position_ids"], torch.arange(SEQ))
        assert torch.equal(item["loss_mask"], (item["tokens"] != tiny_data.eos_id).float())
        assert torch.equal(item["attention_mask"][0], torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1))
        expected = store.routing("train", [i])
        assert torch.equal(item["routing_ids"], expected.ids[0]) and torch.equal(item["routing_weights"],
                                                                                 expected.weights[0])
    assert set(GrouterGPTDataset(tiny_data, split="val")[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
    with pytest.raises(GrouterError, match="does not match the dataset's val split"):
        GrouterGPTDataset(tiny_data, SimpleNamespace(manifest=store.manifest, path=store.path, seq_len=SEQ,
                                                     n_sequences=lambda split: 1), split="val")


def test_plan_data_loader_serves_each_rank_its_plan_share(store, tiny_data, plan2):
    dataset = GrouterGPTDataset(tiny_data, store)
    for rank in range(2):
        loader = plan_data_loader(dataset, plan2, rank, 2, micro_batch_size=2)
        seen = [b["tokens"] for _, b in zip(range(4), loader)]
        idx = np.concatenate(plan2.samples[rank][:2])
        assert torch.equal(torch.cat(seen), tiny_data.split("train").batch(idx)["input_ids"])
        resumed = plan_data_loader(dataset, plan2, rank, 2, micro_batch_size=2, consumed_samples=8)  # 1 global batch
        assert torch.equal(next(iter(resumed))["tokens"], seen[2])
    with pytest.raises(GrouterError, match="micro batches of 3 must divide"):
        plan_data_loader(dataset, plan2, 0, 2, micro_batch_size=3)
    with pytest.raises(GrouterError, match="the plan is for 2 data-parallel ranks but world_size is 3"):
        plan_data_loader(dataset, plan2, 0, 3, micro_batch_size=2)
    with pytest.raises(GrouterError, match="consumed_samples=6 is not a whole number of micro-steps of 4"):
        plan_data_loader(dataset, plan2, 0, 2, micro_batch_size=2, consumed_samples=6)
    with pytest.raises(GrouterError, match="split 'train', the dataset has .* of 'val'"):
        plan_data_loader(GrouterGPTDataset(tiny_data, split="val"), plan2, 0, 2, micro_batch_size=2)


def test_expert_parallel_smaller_than_data_parallel_deals_whole_plan_batches(store, tiny_data, plan2):
    """DP 4, EP 2 (a plan for 2 ranks): expert-parallel group g (DP ranks 2g, 2g+1) runs plan batch 2b+g of
    Megatron global batch b, so each group's expert placement is the plan's, exactly; plan_order is the
    index stream whose micro-steps Megatron's pretraining sampler deals to the DP ranks in that way."""
    dataset = GrouterGPTDataset(tiny_data, store)
    for dp_rank in range(4):
        group, ep_rank = divmod(dp_rank, 2)
        loader = plan_data_loader(dataset, plan2, dp_rank, 4, micro_batch_size=2)
        seen = [b["tokens"] for _, b in zip(range(4), loader)]  # 2 micro-batches per global batch
        idx = np.concatenate([plan2.samples[ep_rank][2 * b + group] for b in range(2)])
        assert torch.equal(torch.cat(seen), tiny_data.split("train").batch(idx)["input_ids"])
    order = plan_order(plan2, 2, 4)
    full = sum(len(b) == plan2.global_batch // 2 for b in plan2.samples[0])  # the short last batch is left out
    assert len(order) == (full // 2) * 2 * plan2.global_batch and len(set(order.tolist())) == len(order)
    micro_step = order[:8].reshape(4, 2)  # first micro-step: DP rank d's micro-batch
    assert all(np.array_equal(micro_step[d], plan2.samples[d % 2][d // 2][:2]) for d in range(4))


# -- ids only: Megatron's own router replaying stored ids; a replay log as routed_experts -----------------
def megatron_routed(**overrides):
    """Megatron's GPTModel with its own TopKRouter and routing replay enabled (no grouter router)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    cfg = config(moe_enable_routing_replay=True, **overrides)
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_decoder_block_spec(cfg, False), vocab_size=512,
                    max_sequence_length=SEQ)


def test_router_replay_serves_stored_ids_with_the_live_routers_weights(megatron_cpu, store, tiny_data, plan2):
    """drive_router_replay: every TopKRouter routes each micro-batch to exactly its stored experts (relabelled by
    the plan), with weights from its own gate (a softmax over those k scores, so its weights learn); under full
    recompute, two checkpointed forwards then both backwards give the gradients of plain forward/backward pairs."""
    from megatron.core.transformer.moe.router import TopKRouter

    from grouter.integrations.megatron.replay import drive_router_replay

    dataset = GrouterGPTDataset(tiny_data, store, create_attention_mask=True)
    batches = [default_collate([dataset[i] for i in idx]) for idx in ([0, 1], [2, 3])]
    model = megatron_routed()
    feed = drive_router_replay(model, RoutingFeed.from_store(store, plan2))
    served = []
    for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
        router.register_forward_hook(lambda mod, args, out: served.append([t.detach() for t in out]))
    feed.push(batches[0])
    lm_loss(model, batches[0]).backward()
    feed.check_drained()
    want = dense(relabel(batches[0]["routing_ids"], plan2.permutation), torch.ones(2, SEQ, K)) > 0
    assert len(served) == 2 and all(torch.equal(routing_map, want) for _, routing_map in served)
    for probs, routing_map in served:
        assert bool((probs[~routing_map] == 0).all()) and torch.allclose(probs.sum(1), torch.ones(len(probs)))
    assert all(r.weight.grad is not None and bool(r.weight.grad.abs().sum() > 0)
               for r in model.modules() if isinstance(r, TopKRouter))

    def grads(schedule: str) -> list[torch.Tensor]:
        model = megatron_routed(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        return scheduled_grads(model, drive_router_replay(model, RoutingFeed.from_store(store)), batches, schedule)

    for got, ref in zip(grads("F0F1B0B1"), grads("F0B0F1B1")):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(GrouterError, match="moe_enable_routing_replay=True"):
        drive_router_replay(build(RoutingFeed.from_store(store)), RoutingFeed.from_store(store))


def test_a_replay_log_becomes_a_store_that_plans_and_exports_back(megatron_cpu, store, tiny_data, tmp_path):
    """Megatron's routers record their own top-k (RECORD); recorded_routed_experts gives [b, seq, layers, k];
    saved (.npy, .safetensors), imported through write_store (ids only: weights 1/k, flagged), planned by
    plan_placement, exported back unchanged. A store exports as routed_experts per layer, per-layer heads too."""
    from grouter.integrations.megatron.replay import record_router_replay, recorded_routed_experts
    from grouter.integrations.routed_experts import (IDS_ONLY, export_routed_experts, import_routed_experts,
                                                     load_routed_experts, save_routed_experts)

    dataset = GrouterGPTDataset(tiny_data, create_attention_mask=True)
    batch = default_collate([dataset[i] for i in range(8)])
    model = megatron_routed()
    record_router_replay(model)
    chosen = []
    for router in (m for m in model.modules() if type(m).__name__ == "TopKRouter"):
        router.register_forward_hook(lambda mod, args, out: chosen.append(out[1].detach()))
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    log = recorded_routed_experts(model, 8, SEQ)
    assert log.shape == (8, SEQ, 2, K)
    for layer, routing_map in enumerate(chosen):  # the ids are the experts Megatron's router chose
        assert torch.equal(dense(log[:, :, layer], torch.ones(8, SEQ, K)) > 0, routing_map)
    for name in ("log.npy", "log.safetensors"):
        assert np.array_equal(load_routed_experts(save_routed_experts(tmp_path / name, log.numpy())), log.numpy())
    imported = RoutingStore.open(import_routed_experts(tmp_path / "store", {"train": log.numpy()}, E))
    assert imported.manifest["grouter_fingerprint"] == IDS_ONLY and len(imported.heads) == 2
    assert np.array_equal(export_routed_experts(imported), log.numpy())
    assert torch.equal(imported.routing("train", [0]).weights, torch.full((1, SEQ, 2, K), 1 / K))
    plan = plan_placement(imported, PlaceOptions(ranks=2, global_batch=4, clusters=2, seed=0))
    assert plan.n_experts == E and sorted(np.concatenate([np.concatenate(b) for b in plan.samples]).tolist()) == \
        list(range(8))
    three = export_routed_experts(store, "val", n_layers=3, idx=[0, 1])  # one-head store: every layer the same
    assert three.shape == (2, SEQ, 3, K) and all(np.array_equal(three[:, :, i], store.ids("val")[[0, 1]])
                                                for i in range(3))
    bad = log.numpy().copy()
    bad[0, 0, 0] = bad[0, 0, 0, ::-1][0]
    for arrays, match in (({"train": log.numpy()[..., 0]}, r"\[batch, seq, layers, k\]"),
                          ({"train": log.numpy() + E}, "outside 0..7"), ({"train": bad}, "expert twice")):
        with pytest.raises(GrouterError, match=match):
            import_routed_experts(tmp_path / "bad", arrays, E)
    with pytest.raises(GrouterError, match="the dataset has .* sequences of 32"):
        import_routed_experts(tmp_path / "bad", {"train": log.numpy()}, E, data=tiny_data)


# -- GPU variants (CUDA, NCCL, Transformer Engine): skipped on this CPU-only machine ------------------------
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NEEDS_GPU_TE = pytest.mark.skipif(GPUS < 1 or importlib.util.find_spec("transformer_engine") is None,
                                  reason="needs a CUDA GPU with Transformer Engine (none here): TE layers, bf16")
NEEDS_2_GPUS = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs (none here): NCCL expert parallelism")


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@NEEDS_GPU_TE
def test_cuda_transformer_engine_bf16_training(store, tiny_data):
    """examples/megatron_train.py on one GPU: TE layer specs, grouped GEMM experts, bf16, activation recompute."""
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                 str(free_port()), "examples/megatron_train.py", "--data", str(tiny_data.path), "--routing",
                 str(store.path), "--device", "cuda", "--transformer-engine", "--bf16", "--recompute", "full",
                 "--steps", "8", "--micro-batch-size", "8", "--lr", "1e-2"])
    losses = [json.loads(line)["loss_rank0"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(losses) == 8 and losses[-1] < losses[0]


@NEEDS_2_GPUS
def test_nccl_alltoall_bytes_equal_the_megatron_cost_model(store, tiny_data, plan2, tmp_path):
    """benchmarks/megatron_bytes.py with NCCL on 2 GPUs: it refuses to finish unless every rank's measured
    dispatch bytes equal the prediction."""
    plan_dir = tmp_path / "plan2"
    plan_dir.mkdir()
    plan2.save(plan_dir)
    _run([sys.executable, "benchmarks/megatron_bytes.py", "--data", str(tiny_data.path), "--routing",
          str(store.path), "--plan", f"2={plan_dir}", "--ranks", "2", "--steps", "2", "--json",
          str(tmp_path / "bytes.json")])
    rows = json.loads((tmp_path / "bytes.json").read_text())["rows"]
    assert all(r["measured"] == r["predicted"] for r in rows)


def test_per_layer_routing_serves_each_layer_its_head(megatron_cpu, tiny_data, tmp_path):
    """A per-layer store (heads of source layers 0 and 1 of 2): the dataset yields [L, H, k], decoder
    layer l's router serves head l (relative depth of Megatron's layer_number), its MoE layer computes
    the manual sum with that head's routing, and a Grouter with per-layer heads routes online the same."""
    from grouter.routers import Heads

    heads = Heads((0, 1), 2)
    synthetic_store(tiny_data, tmp_path / "heads", E, K, clusters=4, heads=heads)
    store = RoutingStore.open(tmp_path / "heads", data=tiny_data)
    feed = RoutingFeed.from_store(store)
    model = build(feed, vocab=tiny_data.vocab_size)
    assert [r.head for r in routers(model)] == list(heads.for_target(2)) == [0, 1]
    recorder = Recorder(model)
    dataset = GrouterGPTDataset(tiny_data, store, create_attention_mask=True)
    batch = default_collate([dataset[i] for i in (4, 9)])
    ids, weights = batch["routing_ids"], batch["routing_weights"]
    assert ids.shape == (2, SEQ, 2, K) and not torch.equal(ids[:, :, 0], ids[:, :, 1])
    feed.push(batch)
    lm_loss(model, batch).backward()
    feed.check_drained()
    assert len(recorder.served) == 2
    assert all(torch.equal(s, dense(ids[:, :, h], weights[:, :, h])) for h, s in enumerate(recorder.served))
    with_mtp = build(RoutingFeed.from_store(store), vocab=tiny_data.vocab_size, mtp_num_layers=1)
    assert [r.head for r in routers(with_mtp)] == [0, 1, 1]  # the MTP layer takes the last layer's head

    layer = model.decoder.layers[1].mlp  # its output: the manual computation with head 1's routing
    x = torch.randn(SEQ, 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    feed.push(batch)
    with torch.no_grad():
        out, _ = layer(x)
        flat, gates = x.reshape(-1, HIDDEN), dense(ids[:, :, 1], weights[:, :, 1])
        ref = sum(gates[:, e:e + 1] * F.linear(layer.config.activation_func(F.linear(flat, ex.linear_fc1.weight)),
                                               ex.linear_fc2.weight)
                  for e, ex in enumerate(layer.experts.local_experts))
    torch.testing.assert_close(out, ref.view_as(out), rtol=1e-5, atol=1e-6)
    feed.clear()
    with pytest.raises(GrouterError, match=r"\[b, L, H=2, k=2\].*the store the routing comes from"):
        feed.push(Routing(ids[:, :, 0], weights[:, :, 0]))

    g = Grouter(GrouterConfig(vocab_size=tiny_data.vocab_size, n_experts=E, top_k=K, d_model=32, n_layers=1, n_heads=2,
                              d_ff=64, max_seq_len=SEQ, head_layers=[0, 1], source_layers=2))
    online = RoutingFeed.online(g)
    model = build(online, vocab=tiny_data.vocab_size)
    recorder = Recorder(model)
    online.push(batch)
    lm_loss(model, batch).backward()
    routed = g.route(batch["tokens"])
    assert len(recorder.served) == 2
    assert all(torch.equal(s, dense(routed.ids[:, :, h], routed.weights[:, :, h])) for h, s in enumerate(recorder.served))
