"""How long the test suite takes: what `make test` runs, and the slow group `make test-slow` runs.

Runs pytest in a subprocess, once per group, and prints the wall time, the CPU time of pytest and
its children, the counts, and the slowest tests. Run it on an idle machine (another PyTorch job on
the same cores can triple the time); docs/BENCHMARKS.md has the figures and the machine.

    python benchmarks/suite_time.py            # both groups
    python benchmarks/suite_time.py --fast     # only what `make test` runs
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"make test": "not slow", "make test-slow": "slow"}


def run_group(marker: str) -> dict:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", marker, "--durations=8", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = proc.stdout.strip().splitlines()
    counts = dict((name, int(n)) for n, name in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail[-1]))
    slowest = [ln.strip() for ln in tail if re.match(r"\s*\d+\.\d+s (call|setup|teardown)", ln)]
    return {"marker": marker, "exit": proc.returncode, "wall_seconds": round(wall, 1),
            "cpu_seconds": round((after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime), 1),
            **counts, "slowest": slowest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="only what `make test` runs")
    args = p.parse_args()
    for name, marker in GROUPS.items():
        if args.fast and marker == "slow":
            continue
        result = run_group(marker)
        print(f"{name}: {result['wall_seconds'] / 60:.1f} min wall, {result['cpu_seconds'] / 60:.1f} min CPU, "
              f"{result.get('passed', 0)} passed, {result.get('skipped', 0)} skipped, {result.get('failed', 0)} failed")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
