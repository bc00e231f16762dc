"""Where a command runs: its device, and the ``torch.distributed`` process group of a launch.

One place for it, so that sharded pre-dispatch, expert parallelism and training agree on what
``--device auto`` means, which backend goes with which device (NCCL with CUDA, gloo on the CPU),
and which GPU a rank uses (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import GrouterError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; with ``local_rank`` (a rank of a launch) CUDA
    means ``cuda:local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GrouterError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GrouterError("CUDA was asked for but is not available; pass --device cpu")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new job on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(n_parameters: int, activation_bytes: int, device: torch.device, what: str) -> None:
    """Refuse, with the estimate, a training job that cannot fit on ``device``: float32 weights,
    gradients and AdamW's two moments take 16 bytes per parameter, plus the activations."""
    need, have = 16 * n_parameters + activation_bytes, available_bytes(device)
    if have is not None and need > have:
        raise GrouterError(f"{what} needs about {need / 2**30:.1f} GiB ({n_parameters / 1e6:.0f}M parameters x 16 "
                           f"bytes for weights, gradients and AdamW state, plus activations) but {device} has "
                           f"{have / 2**30:.1f} GiB free; choose a smaller model or batch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessGroup:
    """The process group a command runs in; a plain single process is world 1, rank 0.

    Joins the group a launcher describes (``torchrun`` sets ``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``/``PORT`` and ``LOCAL_RANK``) or uses one that is already initialised.
    ``always``: start a one-process group when there is no launch, for code that runs collectives
    unconditionally (expert parallelism). ``device`` is this rank's device; the backend follows it.
    Use as a context manager: a group created here is destroyed on exit.
    """

    def __init__(self, device_name: str = "auto", always: bool = False):
        self.created = False
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.device = resolve_device(device_name, local_rank if launched else None)
        if not dist.is_initialized() and (launched or always):
            self._start(launched)
        self.active = dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.local_rank = local_rank if self.active else 0

    def _start(self, launched: bool) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        try:
            if launched:
                dist.init_process_group(backend)
            else:
                dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        except (ValueError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GrouterError(f"torch.distributed could not start ({reason}); launch with torchrun, "
                               "or unset WORLD_SIZE for a single process") from None
        self.created = True

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.active else None

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()

    def all_sum(self, value: int) -> int:
        """The sum of ``value`` over the ranks."""
        if not (self.active and self.world > 1):
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.created:
            dist.destroy_process_group()
            self.created = False

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- CPU process groups for tests and benchmarks ------------------------------------------------
def settle(group=None, seconds: float = 0.1) -> None:
    """Barrier, then give gloo's worker threads time (GIL released) to drop their finished work.

    A gloo worker thread releases a finished collective's tensors after the caller's ``wait()``
    returns; doing so needs the GIL, and if the interpreter is already finalizing, the thread is
    killed inside a destructor and the process aborts ("terminate called without an active
    exception"). Processes started by :func:`spawn` also leave with :func:`exit_now`.
    """
    dist.barrier(group=group)
    time.sleep(seconds)


def exit_now(code: int) -> None:
    """Leave a worker process without interpreter teardown (see :func:`settle`), output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawned(rank: int, world: int, port: int, fn, args, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        settle()
    finally:
        dist.destroy_process_group()
    exit_now(0)  # success only: an exception above reaches torch.multiprocessing's error reporting


def spawn(world: int, fn, args: tuple = (), threads: int = 1) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh CPU processes joined by a gloo group.

    ``fn`` must be importable (a module-level function). Each process uses ``threads`` threads.
    """
    mp.spawn(_spawned, args=(world, free_port(), fn, args, threads), nprocs=world, join=True)
