"""``grouter estimate``: what each stage costs at a given scale, before any of it runs (docs/scale.md).

- **Bytes are exact**: the token data, targets and routing store are laid out by the formats' own
  functions (:func:`grouter.formats.targets.bytes_per_token`, :func:`grouter.formats.store.bytes_per_token`),
  so the estimate is what ``capture`` and ``dispatch`` will write, manifests aside. ``--artifacts DIR``
  checks this against a pipeline directory (``grouter demo``'s ``--out``): each data, targets and
  routing directory's payload files, estimated from its own sizes, against their size on disk.
- **Compute is counted, not measured**: forward FLOPs are 2 per parameter a token meets (the source's
  active parameters; the Grouter's, counted by building it on PyTorch's meta device), plus attention's
  ``2 x layers x seq_len x d_model``; training is 3 forwards. GPU-hours divide by ``--gpu-flops``, an
  assumed sustained rate (default: the hardware profiles' 55 % of an H100's BF16 peak).
- **The planner** is CPU work in one process, fitted by least squares to four measured runs
  (``PLANNER_RUNS``) and extrapolated: an estimate to size a machine by, not a measurement. Its CPU
  seconds are a term per routed token-slot (every pass streams the store), one per sequence and a
  constant; its memory (anonymous: the store's pages are a read-only map the kernel may drop) one per
  token-slot of the refinement's sample (bounded: :func:`grouter.place.refine_limit`), one per
  sequence and a constant; the step-time objective adds one per sequence x rank x head
  (:func:`planner_features`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .errors import GrouterError
from .formats.store import bytes_per_token as store_bytes_per_token
from .formats.targets import bytes_per_token as targets_bytes_per_token
from .formats.targets import resolve_top_m
from .options import COUNT, POSITIVE, option, path_input
from .place import refine_limit
from .runner import Output, Stage

# `benchmarks/place_scale.py` (128 experts top-8, 64 ranks, a global batch of 1,024, one routing head;
# docs/scale.md#what-the-planner-needs), one thread, on the 2-core machine beside a study process: (sequences,
# tokens per sequence, then CPU seconds and peak anonymous GiB while planning with the bytes objective, and the
# same with the step-time objective on the h100x64 profile).
PLANNER_RUNS = [(1_000_000, 32, 47.45, 1.723, 99.37, 2.2), (62_500, 512, 28.75, 0.582, 32.38, 0.578),
                (62_500, 128, 14.41, 0.403, 21.66, 0.415), (250_000, 128, 32.41, 0.688, 45.08, 0.687)]
PLANNER_K, PLANNER_RANKS = 8, 64
H100_MEMORY_GIB = 80
USABLE_MEMORY = 0.9  # of a GPU's memory, for weights, when a source is spread over GPUs (activations: the rest)


@dataclass(frozen=True)
class Setting:
    """A scale to estimate: the source, the Grouter, the corpora and the parallelism."""

    name: str
    source_layers: int  # MoE layers
    source_experts: int
    source_top_k: int
    source_d_model: int
    source_params: float  # all of them: what must sit in GPU memory to capture
    source_active_params: float  # what one token meets: what a forward costs
    vocab_size: int
    seq_len: int
    distill_tokens: float  # captured and distilled on
    target_tokens: float  # the target run's: dispatched and stored
    tune_tokens: float
    target_experts: int
    grouter: dict  # GrouterConfig sizes: d_model, n_layers, n_heads, d_ff
    ranks: tuple[int, ...] = (8, 16, 32, 64)


PRESETS = {
    # The paper's: Qwen3-30B-A3B (48 MoE layers, 128 experts top-8, d 2048, 30.5B params, 3.3B active), 2.6B
    # distillation tokens, a three-layer Grouter of about 60M parameters (50M of them the embedding), 50M
    # tuning tokens, a 30B-token target run at 4,096 tokens per sequence, EP 8 to 64.
    "paper": Setting("paper", 48, 128, 8, 2048, 30.5e9, 3.3e9, 151_936, 4096, 2.6e9, 30e9, 50e6, 128,
                     dict(d_model=320, n_layers=3, n_heads=8, d_ff=1280)),
    # One node's worth: OLMoE-1B-7B (16 MoE layers, 64 experts top-8, d 2048, 6.9B params, 1.3B active), a tenth
    # of the paper's tokens, EP 8.
    "small": Setting("small", 16, 64, 8, 2048, 6.9e9, 1.3e9, 50_304, 4096, 260e6, 3e9, 10e6, 64,
                     dict(d_model=256, n_layers=3, n_heads=4, d_ff=1024), (8,)),
}


def data_bytes_per_token(vocab_size: int, seq_len: int) -> float:
    """A packed dataset's bytes per token: the id (``uint16`` when the vocabulary fits, else ``uint32``) and
    its share of the sequence index (int64 start and domain per sequence)."""
    return (2 if vocab_size <= 2**16 else 4) + 16 / seq_len


def grouter_params(s: Setting, heads: int) -> tuple[int, int]:
    """(all parameters, those a token's forward multiplies by: all but the embedding), counted on a Grouter
    built on the meta device with ``heads`` routing heads."""
    import torch

    from .formats.grouter import GrouterConfig
    from .network import Grouter

    layers = list(range(heads)) if heads > 1 else []
    cfg = GrouterConfig(vocab_size=s.vocab_size, n_experts=s.source_experts, top_k=s.source_top_k,
                        head_layers=layers, source_layers=max(heads, 1) if layers else 0, **s.grouter)
    with torch.device("meta"):
        g = Grouter(cfg)
    total = sum(p.numel() for p in g.parameters())
    embedding = sum(m.weight.numel() for m in g.modules() if isinstance(m, torch.nn.Embedding))
    return total, total - embedding


def stage_table(s: Setting, top_m: int, head_groups: int, gpu_flops: float, gpu_memory_gib: float,
                disk_bandwidth: float) -> list[dict]:
    """One row per stage: what it writes (bytes per token, total) and reads, its FLOPs and GPU-hours, its
    disk hours at ``disk_bandwidth`` bytes/s, how it shards."""
    L, E, k = s.source_layers, s.source_experts, s.source_top_k
    heads = head_groups or L
    g_total, g_matmul = grouter_params(s, heads)
    g_forward = 2 * g_matmul + 2 * s.grouter["n_layers"] * s.seq_len * s.grouter["d_model"]
    src_forward = 2 * s.source_active_params + 2 * L * s.seq_len * s.source_d_model
    gpus_per_copy = math.ceil(2 * s.source_params / (USABLE_MEMORY * gpu_memory_gib * 2**30))
    sequences = s.target_tokens / s.seq_len

    def row(stage, writes, per_token, tokens, flops, shards, reads=0.0):
        return {"stage": stage, "writes": writes, "bytes_per_token": per_token, "tokens": tokens,
                "bytes": per_token * tokens, "reads": reads, "flops": flops, "gpu_hours": flops / gpu_flops / 3600,
                "disk_hours": (per_token * tokens + reads) / disk_bandwidth / 3600, "shards": shards}

    data_token = data_bytes_per_token(s.vocab_size, s.seq_len)
    targets_token = targets_bytes_per_token(L, E, top_m)
    store_token = store_bytes_per_token(k, s.target_experts, heads)
    rows = [
        row("data", "token ids, distillation and target corpora", data_token, s.distill_tokens + s.target_tokens, 0.0,
            "CPU: tokenize or pack once (`grouter data`)"),
        row("capture", f"targets: {L} layers, " + (f"the top {top_m} scores" if top_m else "every score"),
            targets_token, s.distill_tokens, src_forward * s.distill_tokens,
            f"torchrun over sequences (one process per source copy); a copy on {gpus_per_copy} GPU"
            + ("s" if gpus_per_copy > 1 else "") + " (`--device-map auto`, BF16 weights)",
            reads=data_token * s.distill_tokens),
        row("distill", f"a Grouter, {g_total / 1e6:.0f}M parameters ({heads} head" + ("s" if heads > 1 else "") + ")",
            0, s.distill_tokens, 3 * g_forward * s.distill_tokens, "one process: one epoch over the targets",
            reads=(data_token + targets_token) * s.distill_tokens),
        row("tune", "the tuned Grouter", 0, s.tune_tokens, 3 * g_forward * s.tune_tokens, "one process",
            reads=data_token * s.tune_tokens),
        row("dispatch", f"routing store: {heads} head" + ("s" if heads > 1 else "") + f" x top-{k} ids and weights",
            store_token, s.target_tokens, g_forward * s.target_tokens, "torchrun over sequences (a Grouter per process)",
            reads=data_token * s.target_tokens),
        row("train (reads)", "nothing new: each rank reads its sequences' routing with their tokens", 0,
            s.target_tokens, 0.0, "the engine's data parallelism", reads=(data_token + store_token) * s.target_tokens),
    ]
    terms = planner_terms()
    for objective in ("bytes", "steptime"):
        cpu, memory = {}, {}
        for r in s.ranks:
            f = planner_features(sequences, s.seq_len, k, heads, r)
            cpu[r], memory[r] = float(f["cpu"] @ terms["cpu"]), float(f["memory"] @ terms["memory"])
            if objective == "steptime":  # the bytes objective's work, then the step-time stage
                cpu[r] += float(f["stage"] @ terms["stage_cpu"])
                memory[r] += float(f["stage"] @ terms["stage_memory"])
        rows.append({**row(f"place ({objective})", "a placement plan", 0, s.target_tokens, 0.0,
                           "one CPU process (fitted to four measured runs)"), "cpu_seconds": cpu, "memory_gib": memory})
    return rows


def planner_features(sequences: float, seq_len: int, k: int, heads: int, ranks: int) -> dict[str, np.ndarray]:
    """What the planner's costs grow with (:func:`planner_terms` weighs them). CPU: the routed token-slots of
    the union of the heads (every pass streams them), the sequences, a constant. Memory: the token-slots of
    the refinement's sample (whole global batches of the default 16 per rank, at least one, up to
    :func:`~grouter.place.refine_limit` sequences), the sequences, a constant. A sequence's arrays are
    per expert and per rank, and the runs have one size of each (128, 64): its term is theirs, which
    over-counts fewer experts or ranks. The step-time stage adds a term per sequence x rank x head (it
    keeps each head's traffic per rank)."""
    slots_per_sequence = seq_len * k * heads
    batch = 16 * ranks
    sample = min(sequences, max(refine_limit(slots_per_sequence) // batch, 1) * batch)
    return {"cpu": np.array([sequences * slots_per_sequence, sequences, 1.0]),
            "memory": np.array([sample * slots_per_sequence, sequences, 1.0]),
            "stage": np.array([sequences * ranks * heads])}


def planner_terms() -> dict[str, np.ndarray]:
    """The weights of :func:`planner_features`, least squares over ``PLANNER_RUNS``: CPU seconds and GiB of the
    bytes objective, and what the step-time objective adds to them."""
    features = [planner_features(n, t, PLANNER_K, 1, PLANNER_RANKS) for n, t, *_ in PLANNER_RUNS]
    runs = np.array([r[2:] for r in PLANNER_RUNS], dtype=np.float64)

    def fit(name: str, y: np.ndarray) -> np.ndarray:
        return np.linalg.lstsq(np.array([f[name] for f in features]), y, rcond=None)[0]

    return {"cpu": fit("cpu", runs[:, 0]), "memory": fit("memory", runs[:, 1]),
            "stage_cpu": fit("stage", runs[:, 2] - runs[:, 0]), "stage_memory": fit("stage", runs[:, 3] - runs[:, 1])}


# -- checking the formulas against a pipeline directory ------------------------------------------------
def payload_files(directory: Path) -> list[Path]:
    """The files an artifact's size grows with: every file but its JSON manifests, records and plots."""
    return [p for p in directory.rglob("*") if p.is_file() and p.suffix not in (".json", ".png")
            and not p.name.startswith(".")]


def check_artifacts(root: Path) -> list[dict]:
    """For each data, targets and routing directory under ``root``: the payload estimated from its own
    sizes (tokens, layers, experts, k, heads, top-M) against the bytes of its payload files on disk."""
    from .formats.dataset import PackedDataset
    from .formats.store import RoutingStore
    from .formats.targets import Targets

    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        kind, estimated, what = None, None, ""
        if (d / "meta.json").is_file():
            data = PackedDataset.open(d)
            tokens = sum(len(data.split(split)) for split in ("train", "val")) * data.seq_len
            kind, what = "data", f"{tokens:,} tokens in sequences of {data.seq_len}"
            estimated = tokens * data_bytes_per_token(data.vocab_size, data.seq_len)
        elif (d / "targets.json").is_file():
            t = Targets.open(d, verify=False)
            tokens = sum(v["n_sequences"] for v in t.manifest["splits"].values()) * t.manifest["seq_len"]
            layers = len(t.manifest.get("layers", [t.manifest.get("layer")]))
            kind, what = "targets", f"{tokens:,} tokens x {layers} layers x {t.n_experts} experts, top-M {t.top_m}"
            estimated = tokens * targets_bytes_per_token(layers, t.n_experts, t.top_m)
        elif (d / "manifest.json").is_file() and "routing" in d.name:
            s = RoutingStore.open(d, verify=False)
            tokens = sum(s.n_sequences(split) for split in s.manifest["splits"]) * s.seq_len
            heads = len(s.heads) if s.heads else 1
            kind, what = "routing store", f"{tokens:,} tokens x {heads} head(s) x top-{s.k} of {s.n_experts}"
            estimated = tokens * store_bytes_per_token(s.k, s.n_experts, heads)
        if kind:
            actual = sum(p.stat().st_size for p in payload_files(d))
            rows.append({"directory": d.name, "kind": kind, "sizes": what, "estimated_bytes": estimated,
                         "actual_bytes": actual, "ratio": actual / estimated if estimated else None})
    if not rows:
        raise GrouterError(f"{root} holds no data, targets or routing directory; pass a pipeline's --out (e.g. demo)")
    return rows


# -- the command ----------------------------------------------------------------------------------------
@dataclass
class Inputs:
    artifacts: Path = path_input("a pipeline directory (e.g. `grouter demo`'s --out): check the byte formulas against "
                                 "its data, targets and routing stores", required=False)


@dataclass
class Options:
    preset: str = option("paper", "the setting: paper (Qwen3-30B-A3B source, 2.6B distillation tokens, 30B target "
                         "tokens, EP 8-64) or small (OLMoE-1B-7B, a tenth of the tokens, EP 8)",
                         choices=tuple(PRESETS))
    distill_tokens: float | None = option(None, "tokens to capture and distil on (default: the preset's)",
                                          range=POSITIVE)
    target_tokens: float | None = option(None, "tokens of the target run (default: the preset's)", range=POSITIVE)
    top_m: int | None = option(None, "compact targets: the top M scores per layer (capture --top-m; default, as "
                               "capture's, 2k where that is fewer than the source's experts; 0: every score)",
                               range=COUNT)
    head_groups: int = option(0, "routing heads (distill --head-groups; 0: one per source layer)", range=COUNT)
    gpu_flops: float = option(5.5e14, "sustained FLOP/s per GPU for the GPU-hours (default: 55 % of an H100's "
                              "BF16 peak, as the hardware profiles)", range=POSITIVE)
    gpu_memory_gib: float = option(H100_MEMORY_GIB, "memory per GPU, GiB (how many GPUs hold one source copy)",
                                   range=POSITIVE)
    disk_gbps: float = option(2.0, "disk bandwidth, GB/s, for the hours each stage spends reading and writing "
                              "(default: one NVMe drive)", range=POSITIVE)


def estimate(s: Setting, o: Options) -> dict:
    """The stage table of setting ``s`` under options ``o`` (top-M, heads, GPU)."""
    top_m = resolve_top_m(o.top_m, s.source_experts, s.source_top_k)
    if o.head_groups > s.source_layers:
        raise GrouterError(f"--head-groups {o.head_groups} is more than the source's {s.source_layers} MoE layers")
    return {"setting": asdict(s), "assumed": {"disk_gbps": o.disk_gbps, "gpu_flops": o.gpu_flops},
            "stages": stage_table(s, top_m, o.head_groups, o.gpu_flops, o.gpu_memory_gib, o.disk_gbps * 1e9)}


def _size(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b:,.0f} B"


def markdown(result: dict) -> str:
    s, assumed = result["setting"], result["assumed"]
    lines = [f"Setting {s['name']}: source {s['source_layers']} MoE layers x {s['source_experts']} experts top-"
             f"{s['source_top_k']}, {s['source_params'] / 1e9:g}B parameters ({s['source_active_params'] / 1e9:g}B "
             f"active); {s['distill_tokens'] / 1e9:g}B distillation tokens, {s['target_tokens'] / 1e9:g}B target "
             f"tokens in sequences of {s['seq_len']}", "",
             f"| stage | writes | bytes/token | on disk | reads | compute | GPU-hours at {assumed['gpu_flops']:.3g} FLOP/s | "
             f"disk hours at {assumed['disk_gbps']:g} GB/s | how it shards |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["stages"]:
        if "cpu_seconds" in r:
            cpu = ", ".join(f"EP {k}: {v / 3600:,.1f} h, {r['memory_gib'][k]:,.0f} GiB" for k, v in r["cpu_seconds"].items())
            lines.append(f"| {r['stage']} | {r['writes']} | | | | CPU: {cpu} | | | {r['shards']} |")
            continue
        lines.append(f"| {r['stage']} | {r['writes']} | {r['bytes_per_token']:,.4g} | {_size(r['bytes'])} | "
                     f"{_size(r['reads'])} | {r['flops']:.3g} FLOP | {r['gpu_hours']:,.2f} | {r['disk_hours']:,.1f} | "
                     f"{r['shards']} |")
    checks = result.get("artifacts")
    if checks:
        lines += ["", "| directory | kind | sizes | estimated | on disk | on disk / estimated |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {c['directory']} | {c['kind']} | {c['sizes']} | {c['estimated_bytes']:,.0f} | "
                  f"{c['actual_bytes']:,} | {c['ratio']:.6f} |" for c in checks]
    return "\n".join(lines)


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    s = PRESETS[o.preset]
    s = replace(s, distill_tokens=o.distill_tokens or s.distill_tokens, target_tokens=o.target_tokens or s.target_tokens)
    result = estimate(s, o)
    if inputs.artifacts is not None:
        result["artifacts"] = check_artifacts(inputs.artifacts)
    return {"table": markdown(result), **json.loads(json.dumps(result))}


estimate_stage = Stage("estimate", run, Inputs, Options, writes=None)
