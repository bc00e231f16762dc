"""Pre-dispatch: run a frozen Grouter once over the packed data and write its routing store.

Every *input* token of every packed sequence that training reads (both splits, the dataset's
order and boundaries) gets k expert ids and k gate weights (per head, for a Grouter with per-layer
heads); the store's layout and reader are in :mod:`grouter.formats.store`
(docs/method.md#pre-dispatch-and-the-routing-store).

Writing is resumable and atomic: the work happens in ``.OUT.partial`` beside ``OUT`` with a
``progress.json``; rerun the same command after a kill and it continues at the last recorded
batch, and the result is byte-identical to an uninterrupted run, because batches always start at
multiples of ``batch_size`` from the start of a split (batch composition can change floating
point results on some backends) and the Grouter runs in eval mode in float32.

Sharding over processes: launch with torchrun, e.g. ::

    torchrun --nproc_per_node 4 -m grouter.cli dispatch --grouter G --data D --out R

(or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; an already
initialised ``torch.distributed`` process group is used as it is). How the sequences are shared
out, written and resumed is :mod:`grouter.sharding`; the store is byte-identical to a
single-process one. After a final barrier rank 0 checksums the files, writes the manifest and
renames the directory into place. On CUDA each rank uses ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .device import ProcessGroup
from .errors import GrouterError
from .formats.dataset import SPLITS, DataSplit, PackedDataset
from .formats.store import WEIGHTS_DTYPES, StoreWriter, bytes_per_token
from .network import LEAK_WARNING, Grouter
from .options import POSITIVE_INT, option, path_input
from .runner import Output, Stage
from .sharding import ShardedJob

# Flush the files and record progress every this many batches (per rank, at common steps).
CHECKPOINT_EVERY = 64


def _load_grouter(path: str | Path, data: PackedDataset, k: int | None) -> tuple[Grouter, str, int]:
    """The Grouter, its fingerprint (of the weights as saved) and the k to store."""
    model = Grouter.from_pretrained(path)
    fingerprint = model.fingerprint()  # before any dtype or device move
    E = model.cfg.n_experts
    k = model.cfg.top_k if k is None else int(k)
    if not 1 <= k <= E:
        raise GrouterError(f"k = {k} is not possible with the Grouter's {E} experts; use 1 <= --k <= {E}")
    model.check_data(data)
    if data.seq_len > model.cfg.max_seq_len:
        raise GrouterError(f"the dataset's sequences ({data.seq_len} tokens) are longer than the Grouter's "
                           f"max_seq_len ({model.cfg.max_seq_len}); pack the data with --seq-len "
                           f"{model.cfg.max_seq_len} or less")
    if not model.cfg.causal:
        warnings.warn(LEAK_WARNING, stacklevel=4)  # past the inference_mode wrapper to the caller
    return model, fingerprint, k


def _route_shard(model: Grouter, split: DataSplit, writer: StoreWriter, job: ShardedJob, k: int, batch_size: int,
                 show: bool) -> int:
    """Route this rank's sequences of ``split`` into the store; returns the tokens routed."""
    name, n = split.name, len(split)
    lo, hi, first = job.shard(name, n, batch_size)
    maps = writer.maps(name, lo, hi)
    bar = tqdm(total=hi - lo, initial=first - lo, desc=f"dispatch {name}", unit="seq",
               disable=not show or job.group.rank != 0, mininterval=2)
    routed = 0

    def flush():
        for m in maps or ():
            m.flush()

    for a, b in job.batches(name, n, batch_size, flush, CHECKPOINT_EVERY):
        logits = model(split.batch(np.arange(a, b))["input_ids"].to(job.group.device))
        if not torch.isfinite(logits).all():
            raise GrouterError(f"the Grouter produced non-finite logits for {name} sequences {a}..{b - 1}; "
                               "are its weights corrupt?")
        writer.put(maps, a - lo, model.route_logits(logits, k))
        routed += (b - a) * split.seq_len
        bar.update(b - a)
    bar.close()
    return routed


@dataclass
class Inputs:
    grouter: Path = path_input("the frozen Grouter (a tune, fold or distill output)")
    data: Path = path_input("the dataset to route")


@dataclass
class Options:
    k: int | None = option(None, "experts per token (default: the Grouter's top-k)", range=POSITIVE_INT)
    batch_size: int = option(16, "sequences per Grouter forward (small batches suit a CPU, use more on a GPU; "
                             "docs/BENCHMARKS.md); resuming needs the same value", range=POSITIVE_INT, memory=True)
    weights_dtype: str = option("bfloat16", choices=tuple(sorted(WEIGHTS_DTYPES)))
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", how=True)


@torch.inference_mode()
def run(inputs: Inputs, o: Options, out: Output) -> dict | None:
    """Write the routing store ``out`` for both splits of the data; resumable, atomic, shardable.

    Returns (on rank 0; None on the others) ``{"routing", "k", "n_experts", "tokens",
    "bytes_per_token", "seconds", "tokens_per_second", "resumed", "world_size"}``, and ``head_layers``
    for per-layer heads (tokens: all tokens in the store; bytes_per_token: ids + weights of every
    head, manifest excluded; the rate counts the tokens routed by this invocation over all ranks,
    divided by its wall time including loading and checksumming).
    """
    t0 = time.perf_counter()
    data = PackedDataset.open(inputs.data)
    model, fingerprint, k = _load_grouter(inputs.grouter, data, o.k)
    E, sizes = model.cfg.n_experts, {name: len(data.split(name)) for name in SPLITS}
    with ProcessGroup(o.device) as group:
        model = model.float().to(group.device).eval()
        job = ShardedJob(out, {"device_type": group.device.type}, group, "dispatch")
        writer = StoreWriter(job.work, data.seq_len, k, E, o.weights_dtype, model.cfg.heads)
        for name in SPLITS:  # rank 0 sizes the files every rank writes into
            if group.rank == 0 and not writer.allocate(name, sizes[name]):
                job.forget(name)
            writer.sizes[name] = sizes[name]
        done = job.read()
        routed = sum(_route_shard(model, data.split(name), writer, job, k, o.batch_size, out.progress)
                     for name in SPLITS)
        routed = group.all_sum(routed)
        group.barrier()
        if group.rank == 0:
            writer.finish(data, fingerprint, str(Path(inputs.grouter).resolve()), model.cfg.causal)
        job.finish()  # the store is in place before any rank returns
        world = group.world
    seconds = time.perf_counter() - t0
    heads = model.cfg.head_layers
    if group.rank != 0:
        return None
    return {"routing": str(out.path), "k": k, "n_experts": E, **({"head_layers": heads} if heads else {}),
            "tokens": sum(sizes.values()) * data.seq_len,
            "bytes_per_token": bytes_per_token(k, E, model.cfg.n_routing_heads), "seconds": round(seconds, 3),
            "tokens_per_second": round(routed / seconds, 1) if seconds > 0 else 0.0,
            "resumed": any(done.values()), "world_size": world}


dispatch = Stage("dispatch", run, Inputs, Options, writes="resumable")
