"""Capture from built-in sources: logits equal the full model's, prefix-only, resumable, validated."""


import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from grouter.artifacts import read_json, write_json
from grouter.capture import BuiltinRouterPrefix, capture
from grouter.errors import GrouterError
from grouter.formats.targets import Targets
from grouter.integrity import file_checksum, file_sha256
from grouter.model import MoEConfig, MoELM


def make_source(tmp_path, data, name="src", **kw) -> MoELM:
    cfg = dict(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_layers=3, n_heads=2,
               d_expert=16, n_experts=8, top_k=2, router="aux")
    model = MoELM(MoEConfig(**{**cfg, **kw}))
    model.save_pretrained(tmp_path / name, extra={"data": {"tokenizer_sha256": data.meta["tokenizer_sha256"]}})
    return model


def full_forward_router_logits(model: MoELM, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Reference: run the whole model and hook the router's input."""
    seen = {}
    router = model.blocks[layer].moe.router
    handle = router.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    with torch.no_grad():
        model(input_ids)
    handle.remove()
    return seen["h"].float() @ router.gate.weight.float().T


@pytest.mark.parametrize("layer", [0, 2])
def test_captured_logits_equal_full_forward(tmp_path, tiny_data, layer):
    model = make_source(tmp_path, tiny_data).eval()
    capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, layer=layer, top_m=0, progress=False)
    targets = Targets.open(tmp_path / "t")
    idx = np.arange(5)
    expected = full_forward_router_logits(model, tiny_data.split("train").batch(idx)["input_ids"], layer)
    got = targets.logits("train", idx)
    torch.testing.assert_close(got, expected.view(got.shape).half().float(), rtol=0, atol=1e-3)
    assert targets.array("val").shape == (len(tiny_data.split("val")), tiny_data.seq_len, 8)
    assert targets.manifest["source"]["layer"] == layer


@pytest.mark.parametrize("layers", [[0, 2], "all"])
def test_several_layers_equal_each_layers_own_logits(tmp_path, tiny_data, layers):
    """Per-layer heads: the scores of every captured layer, [n, L, H, E], are that layer's gate logits."""
    model = make_source(tmp_path, tiny_data).eval()
    result = capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, layers=layers, top_m=0, progress=False)
    chosen = [0, 1, 2] if layers == "all" else layers
    targets = Targets.open(tmp_path / "t")
    m = targets.manifest
    assert (m["version"], m["layers"], m["source_layers"], "layer" in m) == (3, chosen, 3, False)
    assert result["layers"] == chosen and targets.layers == chosen and targets.heads.layers == tuple(chosen)
    idx = np.arange(5)
    ids = tiny_data.split("train").batch(idx)["input_ids"]
    got = targets.logits("train", idx)
    assert got.shape == (5, tiny_data.seq_len, len(chosen), 8)
    for h, layer in enumerate(chosen):
        expected = full_forward_router_logits(model, ids, layer).view(5, tiny_data.seq_len, 8)
        torch.testing.assert_close(got[:, :, h], expected.half().float(), rtol=0, atol=1e-3)
    assert [g["layer"] for g in m["source"]["gates"]] == chosen and m["source"]["n_layers"] == 3
    assert targets.array("val").shape == (len(tiny_data.split("val")), tiny_data.seq_len, len(chosen), 8)


def test_one_layer_targets_keep_their_layout(tmp_path, tiny_data):
    """One layer (also as a one-element list) is written as before per-layer heads: version 2, ``layer``."""
    make_source(tmp_path, tiny_data)
    capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, layers=[1], top_m=0, progress=False)
    capture(tmp_path / "t1", source=tmp_path / "src", data=tiny_data, layer=1, top_m=0, progress=False)
    m = read_json(tmp_path / "t" / "targets.json", "targets")
    assert (m["version"], m["layer"], "layers" in m, m["source"]["layer"]) == (2, 1, False, 1)
    assert m == read_json(tmp_path / "t1" / "targets.json", "targets")
    targets = Targets.open(tmp_path / "t")
    assert (targets.layers, targets.heads, targets.logits("val", [0]).shape) == ([1], None, (1, 32, 8))


@pytest.mark.parametrize("kw, message", [
    (dict(layers=[0, 0]), "distinct MoE layers"),
    (dict(layers=[0, 3]), "layer 3 is out of range"),
    (dict(layers="most"), "list of layer indices or 'all'"),
    (dict(layer=0, layers=[1, 2]), "not both"),
])
def test_bad_layer_lists(tmp_path, tiny_data, kw, message):
    make_source(tmp_path, tiny_data)
    with pytest.raises(GrouterError, match=message):
        capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, top_m=0, progress=False, **kw)
    assert not (tmp_path / "t").exists()


def test_auxfree_source_records_the_scores_it_selects_by(tmp_path, tiny_data):
    """An aux-loss-free router selects by sigmoid(logits) + its selection bias: that is what is recorded."""
    model = make_source(tmp_path, tiny_data, router="auxfree").eval()
    router = model.blocks[0].moe.router
    router.bias.copy_(torch.linspace(-0.5, 0.5, 8))  # a trained source has a non-zero bias
    model.save_pretrained(tmp_path / "src", extra={"data": {"tokenizer_sha256": tiny_data.meta["tokenizer_sha256"]}})
    capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, top_m=0, progress=False)
    targets = Targets.open(tmp_path / "t")
    assert (targets.manifest["score_function"], targets.manifest["includes_bias"]) == ("sigmoid", True)
    idx = np.arange(4)
    ids = tiny_data.split("train").batch(idx)["input_ids"]
    scores = full_forward_router_logits(model, ids, 0).sigmoid() + router.bias
    got = targets.logits("train", idx)
    torch.testing.assert_close(got, scores.view(got.shape).half().float(), rtol=0, atol=1e-3)
    with torch.no_grad():  # the same experts the model itself chose
        chosen = model(ids).routing_ids[0]
    assert torch.equal(got.topk(2, -1).indices.sort(-1).values, chosen.sort(-1).values)


def test_prefix_only_loading_ignores_later_layers(tmp_path, tiny_data):
    make_source(tmp_path, tiny_data)
    prefix = BuiltinRouterPrefix(tmp_path / "src", layer=1)
    assert not any(n.startswith(("blocks.2.", "blocks.1.moe.experts", "norm.", "lm_head.")) for n in prefix.loaded_tensor_names)
    ids = tiny_data.split("train").batch(np.arange(3))["input_ids"]
    before = prefix.router_logits(ids)
    weights = tmp_path / "src" / "model.safetensors"
    state = load_file(weights)
    state = {k: (torch.full_like(v, float("nan")) if k.startswith(("blocks.2.", "blocks.1.moe.experts", "lm_head."))
                 else v)
             for k, v in state.items() if not k.startswith("blocks.2.attn")}  # garbage and absent
    save_file(state, weights)
    with pytest.raises(GrouterError, match="source weights .* does not match its checksum"):
        BuiltinRouterPrefix(tmp_path / "src", layer=1)
    config = read_json(tmp_path / "src" / "config.json", "config")  # a checkpoint made that way on purpose
    write_json(tmp_path / "src" / "config.json", {**config, "weights_sha256": file_sha256(weights)})
    after = BuiltinRouterPrefix(tmp_path / "src", layer=1).router_logits(ids)
    assert torch.equal(before, after)


def test_capture_resumes_to_identical_bytes(tmp_path, tiny_data, monkeypatch):
    make_source(tmp_path, tiny_data)
    capture(tmp_path / "full", source=tmp_path / "src", data=tiny_data, batch_size=4, top_m=0, progress=False)
    calls = {"n": 0}
    original = BuiltinRouterPrefix.router_logits

    def dying(self, ids):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt  # a kill in the middle of the train split
        return original(self, ids)

    monkeypatch.setattr(BuiltinRouterPrefix, "router_logits", dying)
    with pytest.raises(KeyboardInterrupt):
        capture(tmp_path / "resumed", source=tmp_path / "src", data=tiny_data, batch_size=4, top_m=0, progress=False)
    assert not (tmp_path / "resumed").exists(), "nothing half-written is visible"
    monkeypatch.setattr(BuiltinRouterPrefix, "router_logits", original)
    capture(tmp_path / "resumed", source=tmp_path / "src", data=tiny_data, batch_size=4, top_m=0, progress=False)
    for name in ("train.logits", "val.logits"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_layer_out_of_range(tmp_path, tiny_data):
    make_source(tmp_path, tiny_data)
    with pytest.raises(GrouterError, match="out of range"):
        capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, layer=3, progress=False)
    assert not (tmp_path / "t").exists()


def test_source_without_moe_router(tmp_path, tiny_data):
    make_source(tmp_path, tiny_data, router="hash")
    with pytest.raises(GrouterError, match="not its learned routing"):
        capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, progress=False)


def test_vocabulary_larger_than_source(tmp_path, tiny_data):
    make_source(tmp_path, tiny_data, vocab_size=tiny_data.vocab_size - 10)
    with pytest.raises(GrouterError, match="larger than the source's embedding"):
        capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, progress=False)


def test_other_tokenizer_is_refused(tmp_path, tiny_data):
    model = MoELM(MoEConfig(vocab_size=tiny_data.vocab_size, max_seq_len=32, d_model=32, n_layers=1, n_heads=2,
                            d_expert=16, n_experts=8, top_k=2))
    model.save_pretrained(tmp_path / "src", extra={"data": {"tokenizer_sha256": "0" * 64}})
    with pytest.raises(GrouterError, match="another tokenizer"):
        capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, progress=False)


def test_missing_source(tmp_path, tiny_data):
    with pytest.raises(GrouterError, match="not found"):
        capture(tmp_path / "t", source=tmp_path / "nope", data=tiny_data, progress=False)


def test_nan_in_targets_is_refused(tmp_path, tiny_data):
    make_source(tmp_path, tiny_data)
    capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, top_m=0, progress=False)
    arr = np.memmap(tmp_path / "t" / "train.logits", dtype=np.float16, mode="r+")
    arr[1000] = np.inf
    arr.flush()
    del arr
    with pytest.raises(GrouterError, match="train.logits is corrupt: bytes .* do not match their checksum"):
        Targets.open(tmp_path / "t")
    # with checksums that match (scores written that way by a faulty source): the finiteness check
    manifest = read_json(tmp_path / "t" / "targets.json", "targets")
    manifest["splits"]["train"]["logits"] = file_checksum(tmp_path / "t" / "train.logits")
    write_json(tmp_path / "t" / "targets.json", manifest)
    with pytest.raises(GrouterError, match="NaN or inf near sequence 0"):
        Targets.open(tmp_path / "t")


def test_truncated_targets_and_other_dataset(tmp_path, tiny_data):
    make_source(tmp_path, tiny_data)
    capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, top_m=0, progress=False)
    manifest = read_json(tmp_path / "t" / "targets.json", "targets")
    manifest["dataset_fingerprint"] = "f" * 64
    write_json(tmp_path / "t" / "targets.json", manifest)
    with pytest.raises(GrouterError, match="another dataset"):
        Targets.open(tmp_path / "t")
    capture(tmp_path / "t2", source=tmp_path / "src", data=tiny_data, top_m=0, progress=False)
    f = tmp_path / "t2" / "val.logits"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(GrouterError, match="truncated"):
        Targets.open(tmp_path / "t2")


def test_existing_output_is_not_overwritten(tmp_path, tiny_data):
    make_source(tmp_path, tiny_data)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    with pytest.raises(GrouterError, match="already exists"):
        capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, progress=False)
    assert (tmp_path / "t" / "keep.txt").read_text() == "mine"


# -- sharded capture ------------------------------------------------------------------------------


class _Rank:
    """A process group of which this is rank ``rank`` of ``world``, its collectives no-ops: the
    ranks of a launch, run one after the other in this process."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.device = rank, world, torch.device("cpu")

    def barrier(self) -> None:
        pass


SHARD_BATCH = 16  # the ranks' ranges are unequal: 217 train batches over 2 ranks


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_data):
    """A source and its every-layer targets (the default: compact, top 2k) from one process with one
    thread, as each rank has (the source's floating point may depend on the thread count, never on the
    sharding)."""
    root = tmp_path_factory.mktemp("sharding")
    make_source(root, tiny_data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capture(root / "one", source=root / "src", data=tiny_data, layers="all", batch_size=SHARD_BATCH,
                progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


def test_shards_written_one_after_the_other_equal_one_process(tmp_path, tiny_data, one_process):
    """The sharding logic in-process: two ranks' shards (batch-aligned, unequal in size) fill the files
    of one work directory to the bytes one process writes."""
    from grouter.capture import _capture_shard, open_source
    from grouter.formats.dataset import SPLITS
    from grouter.formats.targets import TargetsWriter, resolve_top_m
    from grouter.runner import Output
    from grouter.sharding import ShardedJob, batch_ranges

    assert batch_ranges(len(tiny_data.split("train")), SHARD_BATCH, 2) == [(0, 1728), (1728, 3470)]
    prefix = open_source(one_process / "src", None, "cpu", "all")
    out = Output(tmp_path / "two", {"test": 1}, progress=False)
    jobs = [ShardedJob(out, {}, _Rank(r, 2), "capture") for r in range(2)]
    writer = TargetsWriter(jobs[0].work, tiny_data.seq_len, 3, 8, top_m=resolve_top_m(None, 8, 2))
    for name in SPLITS:
        writer.allocate(name, len(tiny_data.split(name)))
    for job in jobs:
        job.read()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in jobs:
            for name in SPLITS:
                _capture_shard(prefix, tiny_data.split(name), writer, job, SHARD_BATCH, False)
    finally:
        torch.set_num_threads(threads)
    for name in SPLITS:
        for suffix in ("topm", "topm_ids", "rest"):
            file = f"{name}.{suffix}"
            assert (jobs[0].work / file).read_bytes() == (one_process / "one" / file).read_bytes(), file
    assert jobs[0].dir.progress() == {"train/rank0": 1728, "train/rank1": 1742, "val/rank0": 240, "val/rank1": 227}


def _capture_rank(rank: int, world: int, source: str, data: str, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    capture(out, source=source, data=data, layers="all", batch_size=SHARD_BATCH, device="cpu", progress=False)


def test_two_gloo_processes_capture_the_bytes_of_one(tiny_data, one_process):
    """``torchrun --nproc-per-node 2 -m grouter.cli capture ...`` as two spawned gloo processes of one
    thread each: the targets directory equals one process's byte for byte, manifest included."""
    from grouter.device import spawn

    spawn(2, _capture_rank, (str(one_process / "src"), str(tiny_data.path), str(one_process / "two")))
    files = sorted(p.name for p in (one_process / "one").iterdir() if not p.name.startswith(".grouter-command"))
    compact = [f"{split}.{suffix}" for split in ("train", "val") for suffix in ("rest", "topm", "topm_ids")]
    assert files == ["targets.json", *compact]
    for name in files:
        assert (one_process / "two" / name).read_bytes() == (one_process / "one" / name).read_bytes(), name
    assert not (one_process / ".two.partial").exists()


# -- compact targets ------------------------------------------------------------------------------


def test_compact_targets_keep_the_top_m_exactly_and_the_rest_as_one_log_sum_exp(tmp_path, tiny_data):
    """``--top-m 4`` of 8 experts, 3 layers: the kept scores are the full targets' top 4 (the same
    float16 values, best first), the rest their log-sum-exp; top-k is the full targets' top-k."""
    make_source(tmp_path, tiny_data)
    full = capture(tmp_path / "full", source=tmp_path / "src", data=tiny_data, layers="all", top_m=0, batch_size=256,
                   progress=False)
    compact = capture(tmp_path / "m4", source=tmp_path / "src", data=tiny_data, layers="all", top_m=4,
                      batch_size=256, progress=False)
    assert (full["bytes_per_token"], compact["bytes_per_token"]) == (3 * 8 * 2, 3 * (4 * (2 + 1) + 4))
    t_full, t = Targets.open(tmp_path / "full"), Targets.open(tmp_path / "m4")
    assert (t.top_m, t.manifest["version"], t.bytes_per_token) == (4, 4, compact["bytes_per_token"])
    assert sum((tmp_path / "m4" / f"train.{kind}").stat().st_size for kind in ("topm", "topm_ids", "rest")) == \
        len(tiny_data.split("train")) * tiny_data.seq_len * compact["bytes_per_token"]
    idx = np.arange(len(tiny_data.split("val")))
    scores, teacher = t_full.logits("val", idx), t.teacher("val", idx)
    kept = scores.sort(dim=-1, descending=True).values[..., :4]
    assert torch.equal(teacher.scores, kept), "the same float16 values, best first"
    assert torch.equal(scores.gather(-1, teacher.ids), teacher.scores)
    dropped = scores.scatter(-1, teacher.ids, float("-inf"))
    torch.testing.assert_close(teacher.rest, dropped.logsumexp(-1), rtol=1e-6, atol=1e-6)
    full_topk = scores.topk(2, -1)
    tied = (full_topk.values[..., -1:] == scores).sum(-1) > 1  # a tie at the k-th score may pick either
    same = (full_topk.indices.sort(-1).values == teacher.topk(2).sort(-1).values).all(-1)
    assert same[~tied].all() and (~tied).float().mean() > 0.9
    assert torch.equal(teacher.scores[..., :2], full_topk.values)


@pytest.mark.parametrize("top_m, message", [(1, "at least the source's top-k"), (8, "fewer than its 8 experts")])
def test_top_m_out_of_range_is_refused(tmp_path, tiny_data, top_m, message):
    make_source(tmp_path, tiny_data)
    with pytest.raises(GrouterError, match=message):
        capture(tmp_path / "t", source=tmp_path / "src", data=tiny_data, top_m=top_m, progress=False)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("n_experts, top_m", [(8, 4), (4, 0)])
def test_capture_defaults_to_the_top_2k_scores_where_that_is_fewer_than_the_experts(capsys, tmp_path, tiny_data,
                                                                                    n_experts, top_m):
    """``grouter capture`` without --top-m: 8 experts top-2 keep the top 4 scores (compact targets, as
    measured to cost nothing: docs/study.md); 4 experts top-2 keep every score (2k is all of them)."""
    from grouter.testing import run_cli

    make_source(tmp_path, tiny_data, n_experts=n_experts)
    code, _, err = run_cli(capsys, "capture", "--source", tmp_path / "src", "--data", tiny_data.path, "--out",
                           tmp_path / "t", "--batch-size", "256")
    assert code == 0, err
    t = Targets.open(tmp_path / "t")
    assert t.top_m == top_m and t.bytes_per_token == (4 * (2 + 1) + 4 if top_m else n_experts * 2)
