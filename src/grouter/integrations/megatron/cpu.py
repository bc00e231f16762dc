"""Megatron on the CPU, for tests and demonstrations only: stand-ins for the CUDA calls it makes unconditionally.

Megatron-core and its trainer have no CPU path: they allocate on ``"cuda"``, synchronise CUDA streams
and save the CUDA RNG state whatever the device. On a machine without a GPU we replace those calls
(gloo does the communication) so that the real Megatron code runs: Megatron's model, dispatcher,
schedules, optimizer and checkpointing, and grouter's router, data and entry point. Nothing computed
changes: CPU work is synchronous, so a stream or an event has nothing to wait for, and there is no
CUDA random state to save (dropout is 0 in these runs). On GPUs none of this is used.

* :func:`cpu_stubs` (megatron-core's layers and dispatcher, used by the tests, the benchmark and the
  example): each stand-in names the Megatron file and line it covers.
* :func:`trainer_on_cpu` adds what Megatron's trainer needs (``megatron.training``: ``pretrain()``,
  its optimizer and checkpointing): allocations on ``"cuda"`` go to the CPU, and the CUDA device and
  memory queries answer as for one idle device.
* ``python -m grouter.integrations.megatron.cpu ARGS`` (under ``torchrun``) runs the entry point
  :mod:`grouter.integrations.megatron.pretrain` this way; add ``--distributed-backend gloo``.
"""

from __future__ import annotations

import contextlib
import queue
import sys

import torch
from torch.overrides import TorchFunctionMode


class _NoStream:
    """Stands in for a torch.cuda.Stream and its Event: on the CPU every copy is already synchronous."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event=None) -> None:
        pass

    def record_event(self, event=None) -> "_NoStream":
        return self

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


@contextlib.contextmanager
def _no_rng_fork(self, name=None):
    yield


def _splits_to_numpy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """moe_utils.maybe_move_tensor_to_cpu as it behaves for CUDA tensors: split sizes come back as numpy."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def cpu_stubs(patch) -> None:
    """Let megatron-core's CPU/gloo code paths run: ``patch(obj, name, value)`` is pytest's
    ``monkeypatch.setattr`` (undone after the tests) or ``setattr`` (a spawned worker, the benchmark).

    Not stubbed: transformer/utils.py:35 (get_default_causal_mask builds its mask with device="cuda");
    we pass ``attention_mask`` instead (``GrouterGPTDataset(create_attention_mask=True)``, as
    Megatron's GPTDataset can). Lines are megatron-core 0.16.1's.
    """
    from megatron.core.tensor_parallel import random as mg_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    stream = _NoStream()
    # transformer/moe/token_dispatcher.py:445: MoEAlltoAllTokenDispatcher.__init__ creates torch.cuda.Stream()
    # for its device-to-host copies; :871-:895 (_maybe_dtoh_and_synchronize) call torch.cuda.current_stream(),
    # torch.cuda.stream(s), Stream.record_event() and Event.synchronize().
    patch(torch.cuda, "Stream", lambda *a, **k: stream)
    patch(torch.cuda, "current_stream", lambda *a, **k: stream)
    patch(torch.cuda, "stream", lambda s=None: contextlib.nullcontext())
    # tensor_parallel/mappings.py:91, :141, :148, :181, :442 allocate collective outputs (all-gather,
    # reduce-scatter, the all-to-all of the dispatcher) on device=torch.cuda.current_device().
    patch(torch.cuda, "current_device", lambda: "cpu")
    # transformer/moe/moe_utils.py:1093: maybe_move_tensor_to_cpu converts only CUDA tensors, so on the CPU the
    # all-to-all split sizes that token_dispatcher.py:879-:885 ask for "as_numpy" stay tensors, which
    # torch.distributed.all_to_all_single (tensor_parallel/mappings.py:444) refuses as split sizes.
    patch(token_dispatcher, "maybe_move_tensor_to_cpu", _splits_to_numpy)
    # tensor_parallel/random.py:243: CudaRNGStatesTracker.fork swaps the CUDA RNG state around attention
    # dropout (transformer/dot_product_attention.py:217); no CUDA generator exists.
    patch(mg_random.CudaRNGStatesTracker, "fork", _no_rng_fork)
    # tensor_parallel/random.py:41 and :72 (_get/_set_cuda_rng_state): CheckpointFunction (:514, :552) saves and
    # restores the CUDA RNG state around activation recompute.
    patch(mg_random, "_get_cuda_rng_state", lambda *a, **k: None)
    patch(mg_random, "_set_cuda_rng_state", lambda *a, **k: None)
    # transformer/moe/moe_utils.py:1192: Megatron's own router gate (RouterGatingLinearFunction) reads
    # te_general_gemm, which 0.16.1 defines only when Transformer Engine imports (0.17 sets it to None, as here,
    # for the rest of the process: the name is missing, not replaced).
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _on_cpu(device) -> bool:
    """A device argument that names CUDA: "cuda", "cuda:0", torch.device("cuda") or an int (a CUDA index)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


class _CudaIsCpu(TorchFunctionMode):
    """Allocations and copies to CUDA stay on the CPU (``device="cuda"``, ``.cuda()``, ``.to("cuda")``), and
    ``tensor.type()`` names CUDA types (optimizer/clip_grads.py asserts ``torch.cuda.FloatTensor``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _on_cpu(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _on_cpu(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _memory_stats(*a, **k) -> dict:
    return {}


def trainer_on_cpu() -> None:
    """:func:`cpu_stubs` plus what Megatron's trainer needs on the CPU, for the rest of the process
    (megatron-core 0.17+ with ``megatron.training``; see the module docstring)."""
    from .compat import typing_override_on_python311

    typing_override_on_python311()
    cpu_stubs(setattr)
    patches = {
        # training/initialize.py:61 asserts torch.cuda.is_available() before anything runs.
        "is_available": lambda: True,
        # initialize.py:_initialize_distributed sets up Megatron's parallel state only if device_count() > 0.
        "device_count": lambda: 1,
        # training.py, timers.py, schedules.py, checkpointing.py: synchronise before timing or saving.
        "synchronize": lambda *a, **k: None,
        "set_device": lambda *a, **k: None,
        "empty_cache": lambda: None,
        # training.py:report_memory, theoretical memory logging: CUDA memory statistics.
        "memory_allocated": lambda *a, **k: 0, "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0, "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None, "memory_stats": _memory_stats,
        # tensor_parallel/random.py: model_parallel_cuda_manual_seed and the checkpoint's RNG tracker states.
        "get_rng_state": lambda *a, **k: torch.zeros(0, dtype=torch.uint8),
        "set_rng_state": lambda *a, **k: None, "manual_seed": lambda *a, **k: None,
        "Event": lambda *a, **k: _NoStream(),
    }
    for name, value in patches.items():
        setattr(torch.cuda, name, value)
    torch.nn.Module.cuda = lambda self, device=None: self
    # dist_checkpointing/strategies/filesystem_async.py:53: the first checkpoint save starts a multiprocessing
    # Manager process for its results queue ("spawn": it re-imports the program, 5 s on 2 cores). A synchronous
    # save writes with threads of this process (write_preloaded_data_multithread), so a plain queue serves
    # (not --async-save, which writes from another process).
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results = queue.Queue()
    filesystem_async.get_write_results_queue = lambda *a, **k: results
    # Megatron's fused kernels (jit_fuser = torch.compile) would ask Triton for CUDA devices; run them eagerly.
    torch._dynamo.config.disable = True
    _CudaIsCpu().__enter__()  # stays active for the whole process


def main(argv: list[str] | None = None) -> int:
    """The Megatron entry point with grouter routing, on the CPU (see the module docstring)."""
    trainer_on_cpu()
    from .pretrain import cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
