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
initialised ``torch.distributed`` process group is used as it is). How the sequences (or a
stream's windows) are shared out, written and resumed is :mod:`grouter.sharding`; the store is
byte-identical to a single-process one. After a final barrier rank 0 checksums the files, writes
the manifest and renames the directory into place. On CUDA each rank uses ``cuda:LOCAL_RANK`` and
NCCL; on CPU, gloo.
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
from .formats.stream import MegatronPrefix, StreamWriter, document_windows, window_order
from .routers import Routing
from .network import LEAK_WARNING, Grouter
from .options import COUNT, POSITIVE_INT, option, path_input
from .runner import Output, Stage
from .sharding import ShardedJob

# Flush the files and record progress every this many batches (per rank, at common steps).
CHECKPOINT_EVERY = 64


def _load_grouter(path: str | Path, data: PackedDataset | None, k: int | None) -> tuple[Grouter, str, int]:
    """The Grouter, its fingerprint (of the weights as saved) and the k to store; ``data`` None: a Megatron
    prefix, whose token ids are checked against the vocabulary as they are read."""
    model = Grouter.from_pretrained(path)
    fingerprint = model.fingerprint()  # before any dtype or device move
    E = model.cfg.n_experts
    k = model.cfg.top_k if k is None else int(k)
    if not 1 <= k <= E:
        raise GrouterError(f"k = {k} is not possible with the Grouter's {E} experts; use 1 <= --k <= {E}")
    if data is not None:
        model.check_data(data)
    if data is not None and data.seq_len > model.cfg.max_seq_len:
        raise GrouterError(f"the dataset's sequences ({data.seq_len} tokens) are longer than the Grouter's "
                           f"max_seq_len ({model.cfg.max_seq_len}); pack the data with --seq-len "
                           f"{model.cfg.max_seq_len} or less")
    if not model.cfg.causal:
        warnings.warn(LEAK_WARNING, stacklevel=4)  # past the inference_mode wrapper to the caller
    return model, fingerprint, k


def _shard_loop(job: ShardedJob, name: str, n: int, batch_size: int, route, open_maps, show: bool) -> int:
    """Route this rank's share of ``n`` units (sequences, or a stream's windows) of ``name`` in batches:
    ``route(a, b, lo, maps)`` routes units ``[a, b)`` and returns the tokens it routed; ``open_maps(lo, hi)``
    opens the files this rank writes (``lo``: its first unit)."""
    lo, hi, first = job.shard(name, n, batch_size)
    maps = open_maps(lo, hi)
    bar = tqdm(total=hi - lo, initial=first - lo, desc=f"dispatch {name}", unit="seq",
               disable=not show or job.group.rank != 0, mininterval=2)
    routed = 0

    def flush():
        for m in maps or ():
            m.flush()

    for a, b in job.batches(name, n, batch_size, flush, CHECKPOINT_EVERY):
        routed += route(a, b, lo, maps)
        bar.update(b - a)
    bar.close()
    return routed


def _finite(logits: torch.Tensor, what: str) -> None:
    if not torch.isfinite(logits).all():
        raise GrouterError(f"the Grouter produced non-finite logits for {what}; are its weights corrupt?")


def _route_shard(model: Grouter, split: DataSplit, writer: StoreWriter, job: ShardedJob, k: int, batch_size: int,
                 show: bool) -> int:
    """Route this rank's sequences of ``split`` into the store; returns the tokens routed."""
    device = job.group.device

    def route(a: int, b: int, lo: int, maps) -> int:
        logits = model(split.batch(np.arange(a, b))["input_ids"].to(device))
        _finite(logits, f"{split.name} sequences {a}..{b - 1}")
        writer.put(maps, a - lo, model.route_logits(logits, k))
        return (b - a) * split.seq_len

    return _shard_loop(job, split.name, len(split), batch_size, route,
                       lambda lo, hi: writer.maps(split.name, lo, hi), show)


# -- a Megatron indexed dataset: a routing stream (docs/method.md#routing-streams-for-megatron-indexed-datasets)
def _window(model: Grouter, o: "Options") -> tuple[int, int]:
    """The context window for long documents (default: the sequence length the Grouter was distilled on)
    and the overlap of consecutive windows (default: half of it)."""
    window = o.window or model.cfg.provenance.get("distilled_seq_len")
    if window is None:
        raise GrouterError("this Grouter does not record the sequence length it was distilled on; pass --window "
                           "with that length (documents longer than it are routed in overlapping windows)")
    if window > model.cfg.max_seq_len:
        raise GrouterError(f"--window {window} exceeds the Grouter's max_seq_len {model.cfg.max_seq_len}")
    overlap = window // 2 if o.overlap is None else o.overlap
    if overlap >= window:
        raise GrouterError(f"--overlap {overlap} must be below the window ({window} tokens)")
    return int(window), int(overlap)


def _route_windows(model: Grouter, prefix: MegatronPrefix, writer: StreamWriter, k: int, windows: tuple, device):
    """``route(a, b, lo, maps)`` of :func:`_shard_loop` over the windows ``(document, start, stop, emit)``:
    one forward of windows a..b-1, right-padded (the Grouter is causal: padding changes no earlier
    position), and the routing of each window's kept tokens written at their rows of the stream."""
    doc, start, stop, emit = windows
    item = prefix.tokens.dtype.itemsize

    def route(a: int, b: int, lo: int, maps) -> int:
        first = prefix.offsets[doc[a:b]] + start[a:b]  # the window's first token in .bin
        n = stop[a:b] - start[a:b]
        pos = np.arange(int(n.max()))
        valid = pos < n[:, None]
        prefix.checked.check_rows(first * item, n * item)
        tokens = np.where(valid, prefix.tokens[first[:, None] + np.minimum(pos, n[:, None] - 1)], 0)
        logits = model(torch.from_numpy(tokens.astype(np.int64)).to(device))
        keep = torch.from_numpy(valid & (pos >= (emit[a:b] - start[a:b])[:, None]))
        _finite(logits[keep.to(logits.device)], f"documents {int(doc[a:b].min())}..{int(doc[a:b].max())}")
        routing = model.route_logits(logits, k)
        kept = keep.to(routing.ids.device)
        writer.put(maps, (first[:, None] + pos)[keep.numpy()], Routing(routing.ids[kept], routing.weights[kept],
                                                                        heads=routing.heads))
        return int(keep.sum())

    return route


def _dispatch_stream(inputs: "Inputs", o: "Options", out: Output, t0: float) -> dict | None:
    """Route every document of a Megatron indexed dataset from its start into a routing stream."""
    prefix = MegatronPrefix.open(inputs.megatron_data)
    model, fingerprint, k = _load_grouter(inputs.grouter, None, o.k)
    if prefix.max_token_id >= model.cfg.vocab_size:
        raise GrouterError(f"{prefix.path} holds token id {prefix.max_token_id}, beyond the Grouter's vocabulary of "
                           f"{model.cfg.vocab_size}: it was tokenized with another tokenizer than the source's")
    if model.cfg.document_eos is None:
        raise GrouterError(f"{inputs.grouter} was distilled with a context that runs across documents, but a routing "
                           "stream routes each document from its start; distill with `grouter distill "
                           "--document-start` (then fold and tune that Grouter) and dispatch it")
    window, overlap = _window(model, o)
    windows = document_windows(np.diff(prefix.offsets), window, overlap)
    order = window_order(windows[2] - windows[1])
    windows = tuple(w[order] for w in windows)
    n_tokens, E = int(prefix.offsets[-1]), model.cfg.n_experts
    with ProcessGroup(o.device) as group:
        model = model.float().to(group.device).eval()
        job = ShardedJob(out, {"device_type": group.device.type}, group, "dispatch")
        writer = StreamWriter(job.work, k, E, o.weights_dtype, model.cfg.heads)
        if group.rank == 0 and not writer.allocate(n_tokens):
            job.forget("stream")
        writer.n_tokens = n_tokens
        done = job.read()
        route = _route_windows(model, prefix, writer, k, windows, group.device)
        computed = group.all_sum(_shard_loop(job, "stream", len(order), o.batch_size, route,
                                             lambda lo, hi: writer.maps(), out.progress))
        group.barrier()
        if group.rank == 0:
            context = {"rule": "document", "window": window, "overlap": overlap}
            writer.finish(prefix.offsets, prefix.path, {"fingerprint": fingerprint, "causal": model.cfg.causal,
                                                        "path": str(Path(inputs.grouter).resolve())},
                          context, prefix.tokens.dtype, prefix.max_token_id)
        job.finish()  # the stream is in place before any rank returns
        world, rank = group.world, group.rank
    seconds = time.perf_counter() - t0
    if rank != 0:
        return None
    heads = model.cfg.head_layers
    return {"routing": str(out.path), "format": "stream", "k": k, "n_experts": E,
            **({"head_layers": heads} if heads else {}), "documents": len(prefix.offsets) - 1, "tokens": n_tokens,
            "windows": len(order), "window": window, "overlap": overlap,
            "documents_longer_than_window": int((np.diff(prefix.offsets) > window).sum()),
            "bytes_per_token": bytes_per_token(k, E, model.cfg.n_routing_heads), "seconds": round(seconds, 3),
            "tokens_per_second": round(computed / seconds, 1) if seconds > 0 else 0.0,
            "resumed": any(done.values()), "world_size": world}


@dataclass
class Inputs:
    grouter: Path = path_input("the frozen Grouter (a tune, fold or distill output)")
    data: Path = path_input("a grouter dataset to route: a routing store of its packed sequences", exclusive="data")
    megatron_data: Path = path_input("a Megatron indexed dataset to route (the prefix of its .bin and .idx, as "
                                     "--data-path names it): a routing stream, each document from its start",
                                     exclusive="data", metavar="PREFIX")


@dataclass
class Options:
    k: int | None = option(None, "experts per token (default: the Grouter's top-k)", range=POSITIVE_INT)
    batch_size: int = option(16, "sequences per Grouter forward (small batches suit a CPU, use more on a GPU; "
                             "docs/BENCHMARKS.md); resuming needs the same value", range=POSITIVE_INT, memory=True)
    weights_dtype: str = option("bfloat16", choices=tuple(sorted(WEIGHTS_DTYPES)))
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", how=True)
    window: int | None = option(None, "--megatron-data: the most tokens of a document the Grouter reads at once; "
                                "longer documents go in overlapping windows (default: the sequence length it was "
                                "distilled on)", range=POSITIVE_INT)
    overlap: int | None = option(None, "--megatron-data: tokens each window re-reads from the one before, as "
                                 "context only (default: half the window)", range=COUNT)


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
    if inputs.megatron_data is not None:
        return _dispatch_stream(inputs, o, out, t0)
    if inputs.data is None:
        raise GrouterError("dispatch needs --data DIR (a grouter dataset) or --megatron-data PREFIX")
    if o.window is not None or o.overlap is not None:
        raise GrouterError("--window and --overlap are for --megatron-data: a packed dataset is routed per sequence")
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
