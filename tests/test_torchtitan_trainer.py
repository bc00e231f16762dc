"""torchtitan's Trainer with Grouter routing on the CPU: the small Trainer config of
examples/torchtitan_train.py (``grouter.integrations.torchtitan_trainer.small_trainer_config``),
trained by ``Trainer.train`` itself, on 2 gloo processes.

torchtitan's ``Trainer.__init__`` needs CUDA: it sets the CUDA device and reads the GPU's memory
statistics (``DeviceMemoryMonitor``), since ``torchtitan.tools.utils`` falls back to "cuda" without
an accelerator. So :func:`cpu_trainer` builds the components ``__init__`` builds, from the same
config, in the same order, on the CPU (ParallelDims, the converted model on the meta device,
``parallelize_fn`` or ``pipelining_fn``, optimizer, LR schedule, tokenizer from ``hf_assets_path``,
``GrouterDataLoader``, DCP ``CheckpointManager``, the SPMD context), and then torchtitan's own
``Trainer.train`` runs: its loop, ``train_step``, ``post_dataloading_process``, the pipeline step,
checkpoint save and load. The one change is a metrics processor that records the losses instead
of reading CUDA memory. The whole Trainer, as launched, is in benchmarks/gpu_check.sh.

The store is shaped like the demo's (16 experts, top-4; synthetic clustered routing, since tests
make their own data) with a placement plan for the 2 ranks.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchtitan.models.common.moe import MoE

from grouter.device import spawn
from grouter.formats.dataset import PackedDataset
from grouter.formats.plan import Plan, relabel
from grouter.formats.store import RoutingStore
from grouter.integrations import torchtitan as gt
from grouter.testing import demo_like as demo_shaped
from grouter.testing import documented_command, store_and_plan

E, K = 16, 4
REPO = Path(__file__).resolve().parents[1]
# torchtitan's default SPMD backend (spmd_types) fails inside FSDP on the CPU for its own
# qwen3_moe_debug config too ("all parameters must be DTensors"); partial_dtensor is the one that runs here.
CPU_BACKEND = {"spmd_backend": "partial_dtensor"}


@pytest.fixture(scope="module")
def demo_like(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    store_and_plan(tiny_data, root / "store", root / "plan", E, K, ranks=2, global_batch=8)
    return SimpleNamespace(root=root, data=str(tiny_data.path), routing=str(root / "store"), plan=str(root / "plan"))


# -- torchtitan's Trainer, its components built on the CPU -----------------------------------------------
def recording_metrics(parallel_dims):
    """A torchtitan MetricsProcessor that keeps each step's loss and grad norm (no CUDA memory stats)."""
    from torchtitan.components.metrics import BaseLogger, MetricsProcessor
    from torchtitan.tools import utils

    class Recording(MetricsProcessor):
        def __init__(self):  # noqa: D107 -- MetricsProcessor.__init__ reads CUDA memory statistics
            self.logger, self.parallel_dims, self.color = BaseLogger(), parallel_dims, utils.NoColor()
            self.ntokens_since_last_log, self.data_loading_times, self.records = 0, [], []
            self.num_flops_per_token, self.optimizers, self.model_parts = -1, None, None

        def should_log(self, step: int) -> bool:
            return True

        def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
            self.records.append({"step": step, "loss": global_avg_loss, "grad_norm": grad_norm, **(extra_metrics or {})})
            self.ntokens_since_last_log = 0
            self.data_loading_times.clear()

    return Recording()


def cpu_trainer(config):
    """A torchtitan ``Trainer`` for ``config`` whose components ``Trainer.__init__`` would build on a GPU
    are built here on the CPU, in its order (the process group is already up: gloo)."""
    import torchtitan.distributed.parallel_dims as pd
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.tools import utils
    from torchtitan.trainer import Trainer

    # torchtitan's device without an accelerator is "cuda": its mesh building and the barrier after
    # the first step (set_pg_timeouts: barrier on the current device, then synchronize) are pointed
    # at the CPU instead.
    pd.device_type = "cpu"
    dist_utils.device_module = SimpleNamespace(current_device=lambda: 0, synchronize=torch.cpu.synchronize)
    t = Trainer.__new__(Trainer)
    t.config, t.device = config, torch.device("cpu")
    t.parallel_dims = dims = pd.ParallelDims.from_config(config.parallelism, torch.distributed.get_world_size())
    dist_utils.set_spmd_backend(config.parallelism.spmd_backend)
    batch = dims.get_mesh("batch") if dims.dp_enabled else None
    degree, rank = (batch.size(), batch.get_local_rank()) if batch is not None else (1, 0)
    dist_utils.set_determinism(dims, t.device, config.debug, distinct_seed_mesh_dims=["pp"])
    spec, t.model_config = config.model_spec, config.model_spec.model
    t.model_config.update_from_config(config=config)
    with torch.device("meta"):
        model = t.model_config.build()
    t.metrics_processor = recording_metrics(dims)
    t.loss_fn = config.loss.build(compile_config=config.compile)
    local = config.training.local_batch_size
    global_batch = config.training.global_batch_size if config.training.global_batch_size > 0 else local * degree
    t.gradient_accumulation_steps = global_batch // (local * degree)
    pp_mb = config.parallelism.pipeline_parallel_microbatch_size
    t.num_pipeline_parallel_microbatches = local // pp_mb if dims.pp_enabled else 1
    t.model_parts = _parallelized(t, spec, model, dims)
    t.optimizers = config.optimizer.build(model_parts=t.model_parts)
    t.lr_schedulers = config.lr_scheduler.build(optimizers=t.optimizers, training_steps=config.training.steps)
    t.step = t.ntokens_seen = 0
    t.tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    t.dataloader = config.dataloader.build(
        dp_world_size=degree, dp_rank=rank, tokenizer=t.tokenizer, seq_len=config.training.seq_len,
        local_batch_size=pp_mb if dims.pp_enabled else local,
        snapshot_every_n_steps=(config.checkpoint.interval * t.gradient_accumulation_steps
                                * t.num_pipeline_parallel_microbatches) if config.checkpoint.enable else None)
    t.checkpointer = config.checkpoint.build(dataloader=t.dataloader, model_parts=t.model_parts,
                                             optimizers=t.optimizers, lr_schedulers=t.lr_schedulers,
                                             states={"train_state": t}, sd_adapter=None,
                                             base_folder=config.dump_folder)
    t.train_context = dist_utils.get_spmd_context(parallel_dims=dims)
    t.gc_handler = utils.GarbageCollection(gc_freq=config.training.gc_freq, debug=config.training.gc_debug)
    t.fwd_bwd_fn = t._forward_backward_body
    return t


def _parallelized(t, spec, model, dims) -> list:
    """``parallelize_fn`` (or, under pipeline parallelism, ``pipelining_fn``) as the Trainer calls them,
    then the weights initialised on the CPU."""
    from torch.distributed.fsdp import FSDPModule

    config = t.config
    common = dict(parallel_dims=dims, training=config.training, parallelism=config.parallelism,
                  compile_config=config.compile, ac_config=config.activation_checkpoint,
                  dump_folder=config.dump_folder)
    if dims.pp_enabled:
        t.pp_schedule, parts, t.pp_has_first_stage, t.pp_has_last_stage = spec.pipelining_fn(
            model, device=t.device, model_config=t.model_config, parallelize_fn=spec.parallelize_fn,
            loss_fn=t.loss_fn, **common)
        _premicrobatched_step(t.pp_schedule)
    else:
        parts = [spec.parallelize_fn(model, **common)]
    for m in parts:
        for fsdp in (x for x in m.modules() if isinstance(x, FSDPModule)):
            # torchtitan turns FSDP's gradient division off (factor 1), which torch reduce-scatters
            # as PREMUL_SUM(1): gloo lacks it; a plain SUM is the same sum.
            fsdp.set_force_sum_reduction_for_comms(True)
        m.to_empty(device="cpu")
        with torch.no_grad():
            m.init_weights(buffer_device=None)
        m.train()
    return parts


def _premicrobatched_step(schedule) -> None:
    """torchtitan 0.3.0 calls ``schedule.step(arg_mbs=, kwarg_mbs=, target_mbs=, ...)`` with its
    micro-batches already cut, an API of torch releases after 2.13 (this project's CPU wheel), whose
    ``step`` cuts a whole batch itself; there the pre-cut call is ``_step_microbatches``."""
    if "arg_mbs" in inspect.signature(schedule.step).parameters:
        return

    def step(*, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, loss_kwargs=None, return_outputs=True):
        schedule._stage.has_backward = schedule._has_backward
        schedule._stage.clear_runtime_states()
        schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs=loss_kwargs)

    schedule.step = step


def trained(run: dict, steps: int, folder: str, stop: int | None = None, **parallelism) -> dict:
    """Train the small config for ``steps`` steps (from ``folder``'s latest checkpoint, if any), or
    interrupted after step ``stop``: each step's loss and the weights at the end."""
    from torch.distributed import distributed_c10d

    from grouter.integrations.torchtitan_trainer import small_trainer_config

    if not hasattr(torch.distributed, "set_timeout"):  # torch 2.13 (this project's CPU wheel) names it privately
        torch.distributed.set_timeout = distributed_c10d._set_pg_timeout
    config = small_trainer_config(run["data"], run["routing"], run.get("plan", ""), steps=steps,
                                  local_batch_size=run["batch"], dump_folder=folder)
    for name, value in parallelism.items():
        setattr(config.parallelism, name, value)
    config.checkpoint.enable, config.checkpoint.interval = True, run.get("interval", 3)
    config.debug.seed = 0  # the same initial weights every time the test runs
    if run.get("seed"):  # torchtitan's seed checkpoint: the same initial weights however the model is split
        config.checkpoint.initial_load_path = run["seed"]
    t = cpu_trainer(config)
    if run.get("make_seed"):
        t.checkpointer.save(curr_step=0, last_step=True)  # what `--checkpoint.create_seed_checkpoint` does
        return {}
    if run.get("latest_routing"):  # the control: checkpointed blocks recompute with the latest forward's routing
        handles = {id(m.routing): m.routing for part in t.model_parts for m in part.modules()
                   if isinstance(m, gt.GrouterRouter)}
        for handle in handles.values():
            for hook in handle._hooks[1:]:  # the model's own pre-hook stays; the blocks' go
                hook.remove()
    if stop is not None:  # the job dies after step `stop` (the LR schedule stays that of `steps` steps)
        t.should_continue_training = lambda: t.step < stop
    t.train()
    t.close()
    counts = {f"{n}": m.tokens_per_expert_E.tolist() for part in t.model_parts for n, m in part.named_modules()
              if isinstance(m, MoE)}
    return {"records": t.metrics_processor.records, "weights": weights(t.model_parts), "counts": counts}


def weights(model_parts) -> dict[str, list]:
    """A slice of every parameter, whole (FSDP shards gathered), and the norm of its last gradient, by name."""
    from torch.distributed.tensor import DTensor

    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    out = {}
    for m in model_parts:
        for name, p in m.named_parameters():
            name = name.replace("._checkpoint_wrapped_module", "")
            out[name] = whole(p).detach().flatten()[:32].tolist()
            out[f"{name}.grad_norm"] = None if p.grad is None else float(whole(p.grad).norm())
    return out


# -- a run, checkpointed and resumed: FSDP and EP over 2 ranks, the plan's order -------------------------
def fsdp_ep_runs(rank: int, world: int, run: dict) -> None:
    """Uninterrupted to step 6; and interrupted after step 3, then resumed from its checkpoint to step 6."""
    out = Path(run["out"])
    par = dict(data_parallel_shard_degree=2, expert_parallel_degree=2, **CPU_BACKEND)
    whole = trained(run, 6, str(out / "whole"), **par)
    trained(run, 6, str(out / "resumed"), stop=3, **par)
    resumed = trained(run, 6, str(out / "resumed"), **par)
    (out / f"rank{rank}.json").write_text(json.dumps({"whole": whole, "resumed": resumed}))


def test_trainer_trains_with_the_stores_routing_and_resumes_exactly(demo_like):
    run = dict(data=demo_like.data, routing=demo_like.routing, plan=demo_like.plan, batch=4,
               out=str(demo_like.root / "fsdp_ep"))
    Path(run["out"]).mkdir()
    spawn(2, fsdp_ep_runs, (run,))
    for rank in range(2):
        got = json.loads((Path(run["out"]) / f"rank{rank}.json").read_text())
        whole, resumed = got["whole"], got["resumed"]
        losses = [r["loss"] for r in whole["records"]]
        assert [r["step"] for r in whole["records"]] == [1, 2, 3, 4, 5, 6]
        assert losses[-1] < losses[0] - 0.3, losses
        assert [r["step"] for r in resumed["records"]] == [4, 5, 6]  # steps 1-3 came from the checkpoint
        assert resumed["records"] == whole["records"][3:]
        assert resumed["weights"] == whole["weights"]
        # every MoE layer ran exactly the plan-relabelled stored routing of this rank's sequences (each
        # forward twice: full activation checkpointing recomputes it in the backward)
        want = served_counts(demo_like, rank, batches=6)
        assert len(whole["counts"]) == 4 and all(c == want for c in whole["counts"].values())


def served_counts(demo_like, rank: int, batches: int) -> list[float]:
    """2 x the tokens per (physical) expert of the plan's first local batches for ``rank``."""
    store, plan = RoutingStore.open(demo_like.routing, verify=False), Plan.load(demo_like.plan)
    order = gt.SequenceBatches(PackedDataset.open(demo_like.data).split("train"), 4, rank, 2, plan=plan)
    idx = np.concatenate([b for b, _ in zip(order, range(batches))])
    ids = relabel(store.routing("train", idx).ids, plan.permutation)
    return (2 * torch.bincount(ids.flatten(), minlength=E).float()).tolist()


# -- pipeline parallelism: 2 stages (1F1B, full activation checkpointing) against 1 ---------------------
def pipeline_runs(rank: int, world: int, run: dict) -> None:
    """1 process: the seed checkpoint, then 1 stage. 2 processes: 2 stages, then the control."""
    par = dict(pipeline_parallel_degree=world, pipeline_parallel_microbatch_size=2, **CPU_BACKEND)
    out = Path(run["out"])
    names = {"one": {}} if world == 1 else {"two": {}, "latest": {"latest_routing": True}}
    if world == 1:  # every run starts from these weights, however the model is split
        trained({**run, "make_seed": True}, 1, str(out / "seed"), **par)
    for name, extra in names.items():
        got = trained({**run, **extra}, 1, str(out / name), **par)
        (out / f"{name}{rank}.json").write_text(json.dumps(got))


@pytest.mark.slow
def test_two_pipeline_stages_train_as_one_with_activation_checkpointing(demo_like):
    """Under 1F1B, stage 0 runs the forwards of micro-batches 0 and 1 before the backward of 0, whose
    activation-checkpoint recompute must take micro-batch 0's routing (each checkpointed block keeps
    its forwards' routing by input tensor). The control, without that, recomputes with the latest
    forward's routing, as grouter did before, and its gradient differs."""
    out = demo_like.root / "pp"
    run = dict(data=demo_like.data, routing=demo_like.routing, batch=8, out=str(out), interval=100,
               seed=str(out / "seed" / "checkpoint" / "step-0"))
    spawn(1, pipeline_runs, (run,))
    spawn(2, pipeline_runs, (run,))
    one = json.loads((out / "one0.json").read_text())
    two = [json.loads((out / f"two{r}.json").read_text()) for r in range(2)]
    latest = json.loads((out / "latest1.json").read_text())
    ref, piped, wrong = one["records"], two[1]["records"], latest["records"]  # the last stage has the loss
    assert piped[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6) == wrong[0]["loss"]  # the same forward
    # the step's gradients agree up to the bf16 rounding of the experts' grouped matmuls (per micro-batch
    # here, per batch there), which reaches every parameter through the backward: a few 1e-4 at most;
    # the control's stage-0 gradients are off by several 1e-2
    grads = {**two[0]["weights"], **two[1]["weights"]}
    control = {**latest_weights(out, 0), **latest["weights"]}
    names = [n for n in one["weights"] if n.endswith(".grad_norm") and one["weights"][n] is not None]
    assert len(names) == 39 and all(grads.get(n) is not None for n in names)
    rel = lambda g: max((abs(g[n] / one["weights"][n] - 1), n) for n in names)  # noqa: E731
    assert rel(grads)[0] < 3e-3, rel(grads)
    assert rel(control)[0] > 1.5e-2, rel(control)


def latest_weights(out: Path, rank: int) -> dict:
    return json.loads((out / f"latest{rank}.json").read_text())["weights"]


# -- the launch docs/torchtitan.md gives, run as written ------------------------------------------------
@pytest.mark.slow
def test_the_documented_launch_runs_to_where_it_needs_a_gpu(tmp_path):
    """The one-GPU launch of docs/torchtitan.md, exactly as written, in a folder holding demo-shaped
    ``demo/`` artifacts: torchtitan imports everything it needs, finds grouter's config in
    ``examples.torchtitan_train`` and builds it (converted model checked against the store, grouter's
    dataloader); on this CPU it then stops, with grouter's one-line refusal of a torch without
    ``set_timeout`` or with torchtitan's need of CUDA. benchmarks/gpu_check.sh runs it to the end."""
    command = documented_command(REPO / "docs" / "torchtitan.md", "--nproc_per_node 1", "grouter_qwen3_moe_small")
    demo_shaped(tmp_path / "demo", ranks=4)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    log = done.stdout + done.stderr
    assert "ModuleNotFoundError" not in log and "ImportError" not in log, log[-3000:]
    if torch.cuda.is_available() and hasattr(torch.distributed, "set_timeout"):
        assert done.returncode == 0, log[-3000:]
        return
    assert done.returncode != 0
    if not hasattr(torch.distributed, "set_timeout"):  # refused after the config was built, before training
        assert "GrouterError: torchtitan 0.3.0's Trainer calls torch.distributed.set_timeout" in log, log[-3000:]
    else:
        assert "CUDA" in log, log[-3000:]


def test_the_environment_holds_together():
    """make installs torchtitan with --no-deps and what its Trainer imports (the Makefile says why): every
    requirement of the packages around it is met, so nothing was downgraded under transformers; of
    torchtitan's own, only its datasets<4.8 and wandb (imported only with --metrics.enable_wandb) are not."""
    import torchtitan.train  # noqa: F401  (tensorboard, torch_checkpointing, datasets, ...)

    for dist in ("transformers", "huggingface_hub", "datasets", "tensorboard", "torch_checkpointing", "accelerate",
                 "tokenizers", "fsspec"):
        assert not unmet(dist), unmet(dist)
    assert sorted(req.name for req in unmet("torchtitan")) == ["datasets", "wandb"]


def unmet(dist: str) -> list:
    """The requirements of the installed distribution ``dist`` that the installed versions do not meet."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    from packaging.requirements import Requirement

    out = []
    for req in map(Requirement, distribution(dist).requires or []):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                out.append(req)
        except PackageNotFoundError:
            out.append(req)
    return out
