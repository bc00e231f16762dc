"""Cost of the integrity checks: reading a routing store with and without chunk verification.

Writes (once, into ``--work``) a synthetic routing store of about ``--gb`` GB with the store's own
writer, then reads it the two ways training and planning do, in interleaved A/B rounds (the page
cache warm for both), with the checks off (``RoutingStore.open(verify=False)``) and on (the
default: each 4 MiB chunk hashed the first time it is read):

- ``sequential``: every sequence once, in batches of 256 (what ``grouter place`` and an epoch do);
- ``random``: ``--batches`` random batches of 16 sequences (the first steps of training, where every
  batch touches new chunks: the worst case for lazy verification).

Reports CPU seconds per GB read (``time.process_time``, so another process on the machine matters
less) and the ratio on/off. ``--routing DIR`` measures an existing store (e.g. the demo's) instead.

    OMP_NUM_THREADS=1 python benchmarks/integrity_cost.py --gb 1 --work /tmp/integrity
    OMP_NUM_THREADS=1 python benchmarks/integrity_cost.py --routing demo/routing
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from grouter.formats.store import RoutingStore, StoreWriter
from grouter.routers import Routing
from grouter.testing import synthetic_routing, synthetic_weights


def write_synthetic(out: Path, gb: float, seq_len: int = 64, experts: int = 64, k: int = 8) -> Path:
    """A store of ``gb`` GB of train routing (uint8 ids + bf16 weights: 3k bytes per token)."""
    if (out / "manifest.json").exists():
        return out
    n = int(gb * 1e9 / (seq_len * k * 3))
    out.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter(out, seq_len, k, experts)
    writer.allocate("train", n)
    step = 65536
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        ids, _ = synthetic_routing(hi - lo, seq_len, experts, k, clusters=16, seed=lo)
        maps = writer.maps("train", lo, hi)
        writer.put(maps, 0, Routing(torch.from_numpy(ids.astype(np.int64)), synthetic_weights(ids.shape, lo)))
        for m in maps:
            m.flush()
        del maps
    writer.finish(None, "synthetic", "synthetic")
    return out


def read(store_dir: Path, verify: bool, mode: str, batches: int) -> tuple[float, int]:
    """(CPU seconds, bytes read) of one pass."""
    store = RoutingStore.open(store_dir, verify=verify)
    n = store.n_sequences("train")
    row = store.seq_len * store.k * (store.ids_dtype.itemsize + 2)
    if mode == "sequential":
        order = [np.arange(lo, min(n, lo + 256)) for lo in range(0, n, 256)]
    else:
        rng = np.random.default_rng(0)
        order = [rng.choice(n, 16, replace=False) for _ in range(batches)]
    t0 = time.process_time()
    for idx in order:
        store.routing("train", idx)
    return time.process_time() - t0, sum(len(i) for i in order) * row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/grouter-integrity"))
    ap.add_argument("--routing", type=Path, help="measure this store instead of a synthetic one")
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = args.routing or write_synthetic(args.work / "store", args.gb)
    size = sum(f.stat().st_size for f in store.iterdir() if f.suffix in (".ids", ".weights"))
    rows = {}
    for mode in ("sequential", "random"):
        times = {False: [], True: []}
        for _ in range(args.rounds):  # interleaved A/B rounds
            for verify in (False, True):
                seconds, nbytes = read(store, verify, mode, args.batches)
                times[verify].append(seconds / (nbytes / 1e9))
        off, on = float(np.median(times[False])), float(np.median(times[True]))
        rows[mode] = {"cpu_s_per_gb_off": round(off, 3), "cpu_s_per_gb_on": round(on, 3), "ratio": round(on / off, 3)}
        print(f"{mode}: {off:.3f} s/GB without checks, {on:.3f} s/GB with them: {on / off:.2f}x", flush=True)
    result = {"store": str(store), "store_bytes": size, "rounds": args.rounds, "batches": args.batches, **rows}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
