"""The entry point grouter.integrations.megatron.pretrain: Megatron's own pretrain() with grouter's providers.

Megatron's trainer (megatron.training) ships in the megatron-core wheel from 0.17; these tests run the
newest release `make install` puts beside .venv's 0.16 (grouter.testing.megatron_release), on the CPU:
gloo process groups, and the stand-ins of grouter.integrations.megatron.cpu for the CUDA calls Megatron
makes. One model (4 MoE layers, 8 experts top-2, hidden 32, untied embeddings) and the same arguments in
every run; each rank traces the sequences and per-sequence losses of every micro-batch it computes a loss
for (--grouter-trace), which is what the tests compare. Processes are few because each costs seconds:

* a run of 4 iterations that is killed (SIGKILL) after its checkpoint at iteration 2;
* one process: the uninterrupted run (checkpoints at 2 and 4), then the killed run resumed; then Megatron's
  own data (--data-path, a blend of two indexed datasets, with their routing streams) for 4 iterations
  (a checkpoint at 2), and resumed from its checkpoint at 2;
* two processes: pipeline parallelism 2 (1F1B, selective MoE recompute) and virtual pipeline 2
  (interleaved, full recompute), each from the uninterrupted run's checkpoint at iteration 2 (Megatron's
  distributed checkpoint reshards it), then EP = DP = 2 with a placement plan, then DP = 2 with
  --grouter-replay (Megatron's own routers replaying the stored ids; tests/test_integration_megatron.py
  checks what they serve), then Megatron's own data with EP = DP = 2 and a plan made from a stream.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grouter.device import free_port, spawn
from grouter.dispatch import dispatch
from grouter.formats.store import RoutingStore
from grouter.network import Grouter
from grouter.place import Options as PlaceOptions, place, plan_placement
from grouter.testing import (MEGATRON_RELEASES, document_routing, indexed_items, megatron_release, small_grouter,
                             synthetic_store)

RELEASE = MEGATRON_RELEASES[-1]
ROOT = Path(__file__).resolve().parents[1]
ITERS, GLOBAL_BATCH, MICRO_BATCH = 4, 8, 2
BLEND = ("docs", "paragraphs")  # the prefixes of megatron_text, in --data-path's order


def megatron_args(data: Path, store: Path, trace: Path, *extra: str, cpu: bool = True) -> list[str]:
    """Megatron's command line for the tiny model, grouter's flags first; ``extra`` last (they win);
    ``cpu``: gloo, Megatron's local layers, no fused kernels."""
    model = ("--num-layers 4 --hidden-size 32 --num-attention-heads 2 --ffn-hidden-size 64 --moe-ffn-hidden-size 32 "
             "--num-experts 8 --moe-router-topk 2 --moe-aux-loss-coeff 0 --moe-token-dispatcher-type alltoall "
             "--untie-embeddings-and-output-weights --disable-bias-linear --attention-dropout 0 --hidden-dropout 0")
    training = (f"--micro-batch-size {MICRO_BATCH} --global-batch-size {GLOBAL_BATCH} --train-iters {ITERS} "
                f"--lr 1e-2 --min-lr 1e-3 --lr-decay-style cosine --lr-warmup-iters 1 --lr-decay-iters {ITERS} "
                "--seed 1234 --eval-interval 4 --eval-iters 1 --log-interval 1 --num-workers 0 "
                "--ckpt-format torch_dist")
    on_cpu = ("--distributed-backend gloo --use-cpu-initialization --no-gradient-accumulation-fusion "
           "--transformer-impl local --no-masked-softmax-fusion --no-bias-dropout-fusion --no-rope-fusion "
           "--no-persist-layer-norm")
    return ["--grouter-data", str(data), "--grouter-routing", str(store), "--grouter-trace", str(trace),
            *model.split(), *training.split(), *(on_cpu.split() if cpu else ()), *extra]


def _pretrain_runs(rank: int, world: int, release: str, runs: list[list[str]]) -> None:
    """A spawned rank: Megatron's pretrain() for each command line in turn, its global state reset between."""
    sys.path.insert(0, release)  # before anything imports megatron
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from grouter.integrations.megatron.cpu import trainer_on_cpu

    trainer_on_cpu()
    from megatron.training.training import destroy_global_state

    from grouter.integrations.megatron.pretrain import main

    for argv in runs:
        main(argv)
        destroy_global_state()


def _killed_after_checkpoint(argv: list[str], save: Path, trace: Path, release: Path) -> subprocess.CompletedProcess:
    """Launch a one-process run (the environment torchrun would set) and SIGKILL it once its iteration-2
    checkpoint is written and iteration 3 runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(release), str(ROOT / "src")]), OMP_NUM_THREADS="1",
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "grouter.integrations.megatron.cpu", *argv]
    deadline, marker, log = time.time() + 240, save / "latest_checkpointed_iteration.txt", trace / "rank0.jsonl"
    save.parent.mkdir(parents=True, exist_ok=True)
    with open(save.parent / "output.txt", "w+") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while time.time() < deadline and proc.poll() is None:
            if marker.exists() and log.exists() and any(json.loads(line)["iteration"] >= 2 for line in log.open()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
        out.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read())


def read_trace(trace: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(trace.glob("rank*.jsonl")) for line in path.open()]


def by_iteration(records: list[dict], training: bool = True) -> dict[int, dict[int, tuple[float, float]]]:
    """{iteration: {sequence: (loss sum, tokens)}} of the training (or evaluation) micro-batches."""
    out: dict[int, dict] = {}
    for r in records:
        if r["training"] == training:
            out.setdefault(r["iteration"], {}).update(zip(r["sequences"], zip(r["loss"], r["tokens"])))
    return out


def megatron_data_args(blend: list[str], streams: list[Path], root: Path, *extra: str) -> list[str]:
    """The tiny model's command line on Megatron indexed datasets: --data-path (a prefix or a blend) and the
    routing streams of its prefixes, Megatron's --split, NullTokenizer (vocabulary 512), 32-token samples, the
    streams' 16 experts top-4."""
    args = megatron_args(Path(), Path(), root / "trace", "--num-experts", "16", "--moe-router-topk", "4",
                         "--split", "90,10,0", "--vocab-size", "512", "--seq-length", "32",
                         "--max-position-embeddings", "32", "--data-cache-path", str(root / "cache"), *extra)
    return ["--data-path", *blend, "--grouter-routing", *map(str, streams), *args[4:]]


@pytest.fixture(scope="module")
def runs(tiny_data, megatron_text, tmp_path_factory):
    """Every run of the module, in three launches (see the module docstring); their directories."""
    release = megatron_release(RELEASE)
    root = tmp_path_factory.mktemp("megatron_pretrain")
    store = synthetic_store(tiny_data, root / "store", 8, 2, clusters=4, seed=0, noise=0.1, decay=0.7)
    plan = plan_placement(RoutingStore.open(store, data=tiny_data),
                          PlaceOptions(ranks=2, global_batch=GLOBAL_BATCH, clusters=16, seed=0))
    (root / "plan2").mkdir()
    plan.save(root / "plan2")
    d = {name: root / name for name in ("full", "killed", "pp2", "vpp2", "plan", "replay", "indexed",
                                        "indexed_resumed", "indexed_plan")}
    small_grouter(root / "grouter", document_eos=tiny_data.eos_id)
    for name in BLEND:
        dispatch(root / f"stream-{name}", grouter=root / "grouter", megatron_data=megatron_text[name], progress=False)
    blend = ["0.5", str(megatron_text["docs"]), "0.5", str(megatron_text["paragraphs"])]
    streams = [root / f"stream-{name}" for name in BLEND[::-1]]  # any order: matched to the prefixes by content
    indexed = megatron_data_args(blend, streams, d["indexed"], "--save", str(d["indexed"] / "ckpt"),
                                 "--save-interval", "2")
    indexed_resumed = megatron_data_args(blend, streams, d["indexed_resumed"], "--load", str(d["indexed"] / "ckpt"),
                                         "--ckpt-step", "2")
    place(root / "stream-plan2", routing=root / "stream-docs", ranks=2, seq_len=32, global_batch=GLOBAL_BATCH,
          progress=False)
    indexed_plan = megatron_data_args(blend, streams, d["indexed_plan"], "--expert-model-parallel-size", "2",
                                      "--grouter-plan", str(root / "stream-plan2"), "--train-iters", "2",
                                      "--eval-iters", "0")
    args = {name: megatron_args(tiny_data.path, store, d[name] / "trace") for name in d}
    killed = _killed_after_checkpoint(args["killed"] + ["--save", str(d["killed"] / "ckpt"), "--save-interval", "2"],
                                      d["killed"] / "ckpt", d["killed"] / "trace", release)
    resumed = megatron_args(tiny_data.path, store, root / "resumed" / "trace", "--load", str(d["killed"] / "ckpt"))
    spawn(1, _pretrain_runs, (str(release), [args["full"] + ["--save", str(d["full"] / "ckpt"), "--save-interval", "2"],
                                             resumed, indexed, indexed_resumed]))
    from_two = ["--load", str(d["full"] / "ckpt"), "--ckpt-step", "2", "--pipeline-model-parallel-size", "2"]
    spawn(2, _pretrain_runs, (str(release), [
        args["pp2"] + from_two + ["--recompute-granularity", "selective", "--recompute-modules", "moe"],
        args["vpp2"] + from_two + ["--num-layers-per-virtual-pipeline-stage", "1", "--recompute-granularity", "full",
                                   "--recompute-method", "uniform", "--recompute-num-layers", "1"],
        args["plan"] + ["--expert-model-parallel-size", "2", "--grouter-plan", str(root / "plan2"),
                        "--train-iters", "2", "--eval-iters", "0"],
        args["replay"] + ["--grouter-replay", "--train-iters", "2", "--eval-iters", "0"], indexed_plan]))
    return {**d, "resumed": root / "resumed", "killed_run": killed, "plan_object": plan, "grouter": root / "grouter",
            "blend": blend, "root": root}


@pytest.mark.slow
def test_megatrons_trainer_trains_grouter_routed_moe(runs, tiny_data):
    """pretrain() with grouter's providers: 4 iterations of 4 micro-batches, the sequences Megatron's sampler
    deals from grouter's seeded order, the loss going down, an evaluation, Megatron's checkpoints."""
    trace = read_trace(runs["full"] / "trace")
    train = by_iteration(trace)
    order = np.random.default_rng(1234).permutation(len(tiny_data.split("train")))
    assert sorted(train) == list(range(ITERS))
    for it in range(ITERS):
        assert sorted(train[it]) == sorted(order[it * GLOBAL_BATCH:(it + 1) * GLOBAL_BATCH].tolist())
    mean = [sum(v[0] for v in train[it].values()) / sum(v[1] for v in train[it].values()) for it in range(ITERS)]
    assert mean[-1] < mean[0] - 0.1, mean
    assert by_iteration(trace, training=False)  # Megatron's evaluate ran forward-only passes through the feed
    assert sorted(p.name for p in (runs["full"] / "ckpt").glob("iter_*")) == ["iter_0000002", "iter_0000004"]


@pytest.mark.slow
def test_pipeline_and_virtual_pipeline_give_the_losses_of_one_stage(runs):
    """From the same checkpoint (iteration 2), pipeline parallelism 2 (1F1B) and virtual pipeline 2 (interleaved),
    with activation recompute, train iterations 3 and 4 on the same sequences with the same per-sequence losses
    as the single-stage run; the evaluation after them too."""
    full = read_trace(runs["full"] / "trace")
    for name in ("pp2", "vpp2"):
        trace = read_trace(runs[name] / "trace")
        assert by_iteration(trace) == {it: by_iteration(full)[it] for it in (2, 3)}, name
        assert by_iteration(trace, training=False) == by_iteration(full, training=False), name


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_sequences_and_losses_of_an_uninterrupted_one(runs):
    """SIGKILL after the checkpoint at iteration 2, then --load: iterations 3 and 4 (and the evaluation) see the
    sequences and losses of the run that was never interrupted."""
    killed = runs["killed_run"]
    assert killed.returncode != 0 and not (runs["killed"] / "ckpt" / "iter_0000004").exists(), killed.stdout[-2000:]
    full = by_iteration(read_trace(runs["full"] / "trace"))
    resumed = by_iteration(read_trace(runs["resumed"] / "trace"))
    assert sorted(resumed) == [2, 3] and resumed == {it: full[it] for it in (2, 3)}
    before = by_iteration(read_trace(runs["killed"] / "trace"))
    assert {it: before[it] for it in (0, 1)} == {it: full[it] for it in (0, 1)}
    assert (by_iteration(read_trace(runs["resumed"] / "trace"), training=False)
            == by_iteration(read_trace(runs["full"] / "trace"), training=False))


@pytest.mark.slow
def test_each_data_parallel_rank_trains_the_plans_sequences(runs):
    """EP = DP = 2 with a placement plan: Megatron's sampler gives DP rank r exactly the plan's sequences of rank r,
    global batch after global batch, in micro-batches of 2."""
    plan = runs["plan_object"]
    records = [r for r in read_trace(runs["plan"] / "trace") if r["training"]]
    for rank in range(2):
        for it in range(2):
            seen = [s for r in records if (r["dp_rank"], r["iteration"]) == (rank, it) for s in r["sequences"]]
            assert seen == plan.samples[rank][it].tolist()


@pytest.mark.slow
def test_ids_only_replay_trains_with_megatrons_own_routers(runs, tiny_data):
    """--grouter-replay: Megatron's TopKRouters (moe_enable_routing_replay) replay the stored ids; the run trains
    its 2 iterations on both data-parallel ranks, the sequences of Megatron's sampler in grouter's seeded order."""
    train = by_iteration(read_trace(runs["replay"] / "trace"))
    order = np.random.default_rng(1234).permutation(len(tiny_data.split("train")))
    assert sorted(train) == [0, 1]
    assert all(sorted(train[it]) == sorted(order[it * GLOBAL_BATCH:(it + 1) * GLOBAL_BATCH].tolist()) for it in (0, 1))
    assert all(np.isfinite(loss) for seqs in train.values() for loss, _ in seqs.values())


def megatron_caches(cache: Path, kind: str, split: str = "train") -> list[dict]:
    """The indices each dataset of class ``kind`` saved in --data-cache-path: {array name: array}, with ``path``
    (the prefix a GPTDataset was built on) read from its description."""
    out = []
    for description in cache.glob(f"*-{kind}-{split}-description.txt"):
        base = description.name[:-len("description.txt")]
        arrays = {p.name[len(base):-len(".npy")]: np.load(p, mmap_mode="r") for p in cache.glob(f"{base}*.npy")}
        out.append({**arrays, "path": json.loads(description.read_text()).get("dataset_path")})
    return out


def assert_served_routing_is_the_grouters(run: Path, megatron_text: dict, grouter: Path) -> None:
    """Every training sample of a run on --data-path 0.5 DOCS 0.5 PARAGRAPHS: the routing it pushed to the routers
    (CRC-32 of its ids, from --grouter-trace) is, token by token, the Grouter's over the sample's documents from
    their starts (windows of 64, re-reading 32), the pieces taken from the indices Megatron's BlendedDataset and
    GPTDatasets saved in the run's --data-cache-path; samples of both prefixes are among them."""
    from grouter.integrations.megatron.indexed import sample_pieces  # here: a spawned rank imports this module first

    (blended,) = megatron_caches(run / "cache", "BlendedDataset")
    gpts = {c["path"]: c for c in megatron_caches(run / "cache", "RoutedGPTDataset")}
    assert sorted(gpts) == sorted(str(megatron_text[name]) for name in BLEND)
    documents = {name: indexed_items(megatron_text[name]) for name in BLEND}
    gpt = {name: SimpleNamespace(**gpts[str(megatron_text[name])],
                                 config=SimpleNamespace(add_extra_token_to_sequence=True),
                                 dataset=SimpleNamespace(sequence_lengths=np.array([len(d) for d in documents[name]])))
           for name in BLEND}
    g, reference, seen = Grouter.from_pretrained(grouter), {}, set()
    for record in (r for r in read_trace(run / "trace") if r["training"]):  # samples of the training set
        for sample, served in zip(record["sequences"], record["routing_crc32"]):
            name = BLEND[int(blended["dataset_index"][sample])]
            ids = []
            for d, o, n in zip(*sample_pieces(gpt[name], int(blended["dataset_sample_index"][sample]))):
                if (name, d) not in reference:
                    reference[name, d] = document_routing(g, documents[name][d], 64, 32)[0]
                ids.append(reference[name, d][o:o + n])
            assert zlib.crc32(torch.cat(ids)[:32].numpy().astype(np.int64).tobytes()) == served, (name, sample)
            seen.add(name)
    assert seen == set(BLEND)


@pytest.mark.slow
def test_megatrons_own_data_trains_with_routing_sliced_from_the_stream(runs, megatron_text):
    """--data-path 0.5 DOCS 0.5 PARAGRAPHS --grouter-routing (their streams): Megatron's BlendedDataset over its
    GPTDatasets (its BlendedMegatronDatasetBuilder, its shuffled samples) trains 4 iterations of Megatron's
    sampler's samples and the loss goes down; every sample carried the Grouter's routing of its tokens."""
    train = by_iteration(read_trace(runs["indexed"] / "trace"))
    assert {it: sorted(train[it]) for it in train} == {it: list(range(it * GLOBAL_BATCH, (it + 1) * GLOBAL_BATCH))
                                                        for it in range(ITERS)}
    mean = [sum(v[0] for v in train[it].values()) / sum(v[1] for v in train[it].values()) for it in range(ITERS)]
    assert mean[-1] < mean[0] - 0.05, mean  # from ln 512 = 6.24: 6.24, 6.25, 6.20, 6.13
    assert_served_routing_is_the_grouters(runs["indexed"], megatron_text, runs["grouter"])


@pytest.mark.slow
def test_megatrons_own_data_with_a_streams_plan_keeps_megatrons_samples(runs, megatron_text):
    """EP = DP = 2 with a plan made from a routing stream (grouter place --routing STREAM --seq-len 32): only its
    expert placement applies; Megatron's sampler still deals its own samples, in its order, and each carries its
    routing."""
    records = [r for r in read_trace(runs["indexed_plan"] / "trace") if r["training"]]
    assert {r["dp_rank"] for r in records} == {0, 1}
    for it in range(2):
        seen = sorted(s for r in records if r["iteration"] == it for s in r["sequences"])
        assert seen == list(range(it * GLOBAL_BATCH, (it + 1) * GLOBAL_BATCH))
    assert all(np.isfinite(loss) for r in records for loss in r["loss"])
    assert_served_routing_is_the_grouters(runs["indexed_plan"], megatron_text, runs["grouter"])


@pytest.mark.slow
def test_a_run_on_megatrons_data_resumes_at_its_consumed_samples(runs):
    """--load the indexed run's checkpoint at iteration 2: Megatron's consumed samples resume its sampler over the
    same BlendedDataset, so iterations 3 and 4 (and the evaluation) train the same samples, with the same routing
    and losses, as the run that went on."""
    full, resumed = read_trace(runs["indexed"] / "trace"), read_trace(runs["indexed_resumed"] / "trace")
    assert sorted(by_iteration(resumed)) == [2, 3]
    assert by_iteration(resumed) == {it: by_iteration(full)[it] for it in (2, 3)}
    assert by_iteration(resumed, training=False) == by_iteration(full, training=False)
    crc = lambda trace: {(r["iteration"], s): c for r in trace if r["training"] and r["iteration"] >= 2
                         for s, c in zip(r["sequences"], r["routing_crc32"])}
    assert crc(resumed) == crc(full)


@pytest.mark.slow
def test_a_prefix_without_its_stream_is_one_line_from_the_launcher(runs, megatron_text):
    """The launcher as a user runs it (one process, the environment torchrun sets): --data-path names both
    prefixes but --grouter-routing gives only the paragraphs' stream; after Megatron's initialisation, before a
    model or dataset is built, it exits with status 2 and one line naming the prefix and the command to run."""
    argv = megatron_data_args(runs["blend"], [runs["root"] / "stream-paragraphs"], runs["root"] / "unmatched")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(megatron_release(RELEASE)), str(ROOT / "src")]),
               OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "grouter.integrations.megatron.cpu", *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1] == (f"grouter: error: none of the routing streams given (--grouter-routing) was made from "
                         f"{megatron_text['docs']}; run `grouter dispatch --megatron-data {megatron_text['docs']}` "
                         "and add its output")


# -- on GPUs (benchmarks/gpu_check.sh runs this) ----------------------------------------------------------
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _trainer_path() -> list[str]:
    """PYTHONPATH entries that give megatron.training: none if .venv's megatron-core has it, else the newest
    release `make install` put beside it."""
    if importlib.util.find_spec("megatron.training") is not None:
        return []
    return [str(megatron_release(RELEASE))]


@pytest.mark.skipif(GPUS < 1 or importlib.util.find_spec("transformer_engine") is None,
                    reason="needs a CUDA GPU with Transformer Engine (none here): Megatron's trainer with TE layers, "
                           "bf16, NCCL; benchmarks/gpu_check.sh runs it")
def test_entry_point_on_gpus(tiny_data, tmp_path):
    """torchrun on min(2, GPUs) GPUs, as a Megatron user launches it: TE layers, grouped-GEMM experts, bf16, NCCL,
    EP = number of GPUs, full activation recompute; 4 iterations with a checkpoint at 2, then a resume from it
    sees the same sequences, with losses equal up to bf16 kernels' non-determinism (2 %)."""
    n = min(2, GPUS)
    store = synthetic_store(tiny_data, tmp_path / "store", 8, 2, clusters=4, seed=0, noise=0.1, decay=0.7)
    gpu = ["--transformer-impl", "transformer_engine", "--bf16", "--moe-grouped-gemm", "--expert-model-parallel-size",
           str(n), "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*_trainer_path(), str(ROOT / "src")]))
    for name, extra in (("full", ["--save", str(tmp_path / "ckpt"), "--save-interval", "2"]),
                        ("resumed", ["--load", str(tmp_path / "ckpt"), "--ckpt-step", "2"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(free_port()), "-m", "grouter.integrations.megatron.pretrain",
               *megatron_args(tiny_data.path, store, tmp_path / name, *gpu, *extra, cpu=False)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    full, resumed = by_iteration(read_trace(tmp_path / "full")), by_iteration(read_trace(tmp_path / "resumed"))
    mean = [sum(v[0] for v in full[it].values()) / sum(v[1] for v in full[it].values()) for it in range(ITERS)]
    assert mean[-1] < mean[0] - 0.1, mean
    for it in (2, 3):
        assert sorted(resumed[it]) == sorted(full[it])
        assert all(resumed[it][s][0] == pytest.approx(full[it][s][0], rel=0.02) for s in full[it])
