"""Pipeline throughput on the embedded corpus, side by side in one run.

1. Training step tokens/s (forward + backward + AdamW) of the built-in MoE with
   - stored routing (routing store, expert grouping precomputed by the loader),
   - online Grouter routing (the frozen Grouter runs every step),
   - a learned router + aux loss (the usual baseline),
   interleaved round by round so machine noise hits all three alike; ratios are reported.
2. Capture, distillation and dispatch tokens/s, and dispatch time relative to one epoch of
   target training (the cost of pre-dispatch, paid once).

    python benchmarks/pipeline.py --out /tmp/grouter-bench [--json results.json]

Needs a prepared demo directory (``grouter demo --out DIR``) for the data, source and Grouter;
pass it with ``--demo DIR``. Its Grouter with a head per layer (the default) is timed where it is
there, else the shared head's (``grouter demo --shared-head``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from grouter.capture import capture
from grouter.dispatch import dispatch
from grouter.distill import distill
from grouter.experiments.demo import demo_kind
from grouter.formats.dataset import PackedDataset
from grouter.formats.targets import Targets
from grouter.loop import TrainConfig, build_optimizer
from grouter.model import MoEConfig, MoELM
from grouter.network import Grouter
from grouter.train import external_routing


def step_timer(model: MoELM, opt, batch, routing_fn):
    """One optimizer step; routing_fn(idx) returns the routing (or None) — its cost is counted."""
    idx, inputs, labels = batch

    def step() -> float:
        t = time.perf_counter()
        routing = routing_fn(idx)
        out = model(inputs, labels=labels, routing=routing)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


# Target sizes to time (the demo's Grouter routes all of them: 16 experts, top-4). "demo" is the
# demo's target; "base" is the `--preset base` body, a target about 7x the Grouter's compute.
TARGETS = {"demo": dict(d_model=128, n_layers=4, n_heads=4, d_expert=64),
           "base": dict(d_model=256, n_layers=6, n_heads=8, d_expert=256)}


def training_throughput(demo: Path, rounds: int, batch_size: int, target: dict) -> dict:
    data = PackedDataset.open(demo / "data")
    split = data.split("train")
    kind = demo_kind(demo)
    stored, _, n_experts, k = external_routing(data, routing_dir=demo / f"routing{kind}")
    online, _, _, _ = external_routing(data, grouter_dir=demo / f"grouter{kind}", device="cpu")
    base = dict(vocab_size=data.vocab_size, max_seq_len=data.seq_len, n_experts=n_experts, top_k=k, **target)
    cfg = TrainConfig(batch_size=batch_size)
    variants = {
        "stored routing": (MoEConfig(router="external", **base), lambda idx: stored("train", idx).grouped(n_experts)),
        "online Grouter": (MoEConfig(router="external", **base), lambda idx: online("train", idx)),
        "learned + aux": (MoEConfig(router="aux", **base), lambda idx: None),
    }
    steps = {}
    for name, (mcfg, fn) in variants.items():
        torch.manual_seed(0)
        model = MoELM(mcfg).train()
        steps[name] = (model, build_optimizer(model, cfg), fn)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 2):  # two warm-up rounds
        idx = split.batch_indices(r, batch_size)
        b = split.batch(idx)
        batch = (idx, b["input_ids"], b["labels"])
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            model, opt, fn = steps[name]
            elapsed = step_timer(model, opt, batch, fn)()
            if r >= 2:
                times[name].append(elapsed)
    tokens = batch_size * data.seq_len
    result = {name: tokens / statistics.median(t) for name, t in times.items()}
    return {"tokens_per_second": result,
            "stored_vs_aux": result["stored routing"] / result["learned + aux"],
            "stored_vs_online": result["stored routing"] / result["online Grouter"],
            "epoch_seconds_stored": split.n_sequences * data.seq_len / result["stored routing"]}


def stage_throughput(demo: Path, out: Path) -> dict:
    data = PackedDataset.open(demo / "data")
    tokens = (data.split("train").n_sequences + data.split("val").n_sequences) * data.seq_len
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    capture(out / "targets", source=demo / "source", data=data, top_m=0, progress=False)  # every score, as measured
    capture_s = time.perf_counter() - t
    targets = Targets.open(out / "targets", data)
    g = Grouter.from_pretrained(demo / f"grouter-distilled{demo_kind(demo)}").cfg
    steps, batch = 50, 16
    t = time.perf_counter()
    distill(out / "distill", targets=targets, architecture=dict(d_model=g.d_model, n_layers=g.n_layers,
                                                                 n_heads=g.n_heads, d_ff=g.d_ff),
            schedule=dict(steps=steps, batch_size=batch, eval_every=10_000, checkpoint_every=10_000), progress=False)
    distill_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = dispatch(out / "routing", grouter=demo / f"grouter{demo_kind(demo)}", data=data, progress=False)
    dispatch_s = time.perf_counter() - t
    return {"capture_tokens_per_second": tokens / capture_s,
            "distill_tokens_per_second": steps * batch * data.seq_len / distill_s,
            "dispatch_tokens_per_second": tokens / dispatch_s, "dispatch_seconds": dispatch_s,
            "dispatch_bytes_per_token": summary["bytes_per_token"], "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("demo"), help="a finished `grouter demo --out` directory")
    p.add_argument("--out", type=Path, default=Path("/tmp/grouter-bench"))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--targets", default="demo,base", help=f"target sizes to time, of {', '.join(TARGETS)}")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    train = {name: training_throughput(args.demo, args.rounds, args.batch_size, TARGETS[name])
             for name in args.targets.split(",")}
    stages = stage_throughput(args.demo, args.out)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| target | training step | tokens/s | vs learned + aux |\n|---|---|---|---|")
    for target, t in train.items():
        for name, tps in t["tokens_per_second"].items():
            print(f"| {target} | {name} | {tps:,.0f} | {tps / t['tokens_per_second']['learned + aux']:.2f}× |")
    print(f"\n| stage | tokens/s |\n|---|---|\n| capture | {stages['capture_tokens_per_second']:,.0f} |\n"
          f"| distill (training) | {stages['distill_tokens_per_second']:,.0f} |\n"
          f"| dispatch | {stages['dispatch_tokens_per_second']:,.0f} |\n")
    for target, t in train.items():
        t["dispatch_share_of_epoch"] = stages["dispatch_seconds"] / t["epoch_seconds_stored"]
        print(f"dispatch: {stages['dispatch_seconds']:.1f} s = {100 * t['dispatch_share_of_epoch']:.1f}% of one "
              f"epoch of {target} target training ({t['epoch_seconds_stored']:.0f} s)")
    print(f"{stages['dispatch_bytes_per_token']} bytes/token")
    if args.json:
        args.json.write_text(json.dumps({"training": train, "stages": stages}, indent=2))


if __name__ == "__main__":
    main()
