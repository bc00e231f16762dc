"""Where a training step's time goes: torch.profiler over a few steps of each model of throughput.py.

    python benchmarks/profile_step.py --sizes tiny,small,medium --threads 1
    python benchmarks/profile_step.py --sizes small --group module   # forward time per model part instead

Prints, per model, the step's CPU self time summed by operator category (matmul, attention kernel,
softmax/loss, token permutation, copies, zero-fills, optimizer, other elementwise, overhead), with
``--top N`` the top N operators by self time (CPU, or CUDA time on a GPU), and with
``--group module`` the share of forward time per part (attention / router / experts / lm head+loss / other),
measured with record_function scopes around the model's submodules (forward only: backward ops are
attributed by operator in the default view).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402


CATEGORIES = [  # (label, predicate on the operator name), first match wins; self time is summed
    ("matmul (mm/bmm/addmm/grouped_mm)", lambda n: n in {"aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm",
                                                          "aten::baddbmm", "aten::matmul", "aten::linear"}),
    ("attention kernel (SDPA)", lambda n: "scaled_dot_product" in n),
    ("softmax / log_softmax / nll (loss, router)", lambda n: any(t in n for t in ("softmax", "nll_loss", "logsumexp"))),
    ("gather / scatter / sort / index (token permutation)", lambda n: any(
        t in n for t in ("index", "gather", "scatter", "sort", "bincount", "histc", "one_hot", "nonzero", "where",
                         "topk", "embedding"))),
    ("cat / split / stack / contiguous copies", lambda n: n in {"aten::cat", "aten::stack", "aten::copy_",
                                                                "aten::clone", "aten::contiguous", "aten::split_with_sizes"}),
    ("zero-fill (fill_/zero_/zeros)", lambda n: n in {"aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like"}),
    ("optimizer math (AdamW foreach ops)", lambda n: n.startswith("aten::_foreach") or n in {
        "aten::lerp_", "aten::addcmul_", "aten::addcdiv_", "aten::sqrt", "aten::mul_", "aten::div_", "aten::add_"}),
    ("elementwise (mul/add/silu/rsqrt/...)", lambda n: n.startswith("aten::")),
    ("python / autograd / profiler overhead", lambda n: True),
]


def by_category(events, steps: int) -> list[tuple[str, float, int]]:
    acc = {label: [0.0, 0] for label, _ in CATEGORIES}
    for e in events:
        if e.key.startswith("## ") or e.key.startswith("Optimizer.") or e.key.startswith("autograd::engine"):
            # scopes and wrappers: their self time is the Python/dispatch overhead around the ops
            acc["python / autograd / profiler overhead"][0] += e.self_cpu_time_total
            continue
        for label, pred in CATEGORIES:
            if pred(e.key):
                acc[label][0] += e.self_cpu_time_total
                acc[label][1] += e.count
                break
    return [(label, v[0] / steps / 1e3, v[1] // steps) for label, v in acc.items()]


def scoped(module: torch.nn.Module, label: str):
    fwd = module.forward

    def wrapped(*a, **k):
        with record_function(label):
            return fwd(*a, **k)

    module.forward = wrapped


def add_scopes(name: str, model) -> None:
    if name == "builtin":
        for blk in model.blocks:
            scoped(blk.attn, "## attention")
            scoped(blk.moe.router, "## router")
            scoped(blk.moe.experts, "## experts")
        scoped(model.lm_head, "## lm_head")
    else:
        for layer in model.model.layers:
            scoped(layer.self_attn, "## attention")
            scoped(layer.mlp.gate, "## router")
            scoped(layer.mlp.experts, "## experts")
        scoped(model.lm_head, "## lm_head")


def matmul_flops(s: tp.Size, tokens: int, seq: int) -> dict[str, float]:
    """Multiply-adds of one training step (forward x3 for backward), by part; identical for both models."""
    d, f, L = s.d_model, s.d_expert, s.n_layers
    fwd = {"lm head": tokens * d * s.vocab_size,
           "attention projections": L * tokens * 4 * d * d,
           "attention scores (SDPA)": L * tokens * seq * d,  # QK^T and AV, 2 * B * S^2 * d, halved by causality
           "experts": L * tokens * s.top_k * 3 * d * f,
           "router": L * tokens * d * s.n_experts}
    return {k: 3 * v for k, v in fwd.items()}


def rusage_steps(step, n: int) -> tuple[float, float, int]:
    """(user s, sys s, minor page faults) per step, unprofiled."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return ((r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n, (r1.ru_minflt - r0.ru_minflt) // n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="medium", help=f"comma list of {', '.join(tp.SIZES)}")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hf-experts", default="grouped_mm")
    ap.add_argument("--builtin-experts", default="current", help="current, or a proposed patch (see throughput.py)")
    ap.add_argument("--optimizer", default="adamw", choices=list(tp.OPTIMIZERS))
    ap.add_argument("--malloc-keep", action="store_true", help="as in throughput.py")
    ap.add_argument("--device", default=None)
    ap.add_argument("--top", type=int, default=0, help="also print the top N operators by self time")
    ap.add_argument("--group", default="op", choices=["op", "module"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_keep:
        tp.malloc_keep()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.optimizer}"
          + (", --malloc-keep" if args.malloc_keep else ""))
    summary = []
    for size in args.sizes.split(","):
        s = tp.SIZES[size]
        tokens = args.batch * args.seq
        fl = matmul_flops(s, tokens, args.seq)
        tot = sum(fl.values())
        print(f"\n## {size}: matmul multiply-adds per step {tot / 1e9:.1f} G, "
              + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in fl.items()))
        torch.manual_seed(0)
        ours = tp.builtin_model(s, args.seq, args.builtin_experts)
        hf = tp.hf_model(s, args.seq, args.hf_experts)
        tp.copy_weights(ours, hf)
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, s.vocab_size, (args.batch, args.seq), generator=g).to(device)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        names = ("builtin" if args.builtin_experts == "current" else f"builtin[{args.builtin_experts}]",
                 f"hf[{args.hf_experts}]")
        for name, model in zip(names, (ours, hf)):
            model.to(device).train()
            if args.group == "module":
                add_scopes("builtin" if name.startswith("builtin") else "hf", model)
            step = tp.make_step(model, "hf" if name.startswith("hf") else "builtin", ids, labels, nullcontext,
                                args.optimizer)
            step()  # warm-up
            user, sys_s, faults = rusage_steps(step, args.steps)
            with profile(activities=acts) as prof:
                for _ in range(args.steps):
                    with record_function("## step"):
                        step()
            events = prof.key_averages()
            total = next(e for e in events if e.key == "## step").cpu_time_total / args.steps / 1e3
            print(f"\n=== {name} ({size}): unprofiled {1e3 * (user + sys_s):.0f} ms CPU per step (user {1e3 * user:.0f}, "
                  f"sys {1e3 * sys_s:.0f} = {100 * sys_s / (user + sys_s):.0f}%, {faults:,} page faults); "
                  f"profiled {total:.0f} ms ===")
            row = {"size": size, "model": name, "cpu_ms": 1e3 * (user + sys_s), "sys_ms": 1e3 * sys_s,
                   "page_faults": faults, "profiled_ms": total, "categories": {}}
            if args.group == "module":
                for e in sorted((e for e in events if e.key.startswith("## ") and e.key != "## step"),
                                key=lambda e: -e.cpu_time_total):
                    ms = e.cpu_time_total / args.steps / 1e3
                    print(f"  forward {e.key[3:]:<10} {ms:8.0f} ms  {100 * ms / total:5.1f}% of the step")
            else:
                for label, ms, calls in sorted(by_category(events, args.steps), key=lambda t: -t[1]):
                    print(f"  {label:<52} {ms:8.0f} ms {100 * ms / total:5.1f}%  ({calls} op calls)")
                    row["categories"][label] = ms
                if args.top:
                    print(events.table(sort_by=sort_key, row_limit=args.top, max_name_column_width=40))
            summary.append(row)
            model.cpu()
    if args.group == "op":
        labels_ = [label for label, _ in CATEGORIES]
        short = ["matmul", "SDPA", "softmax/CE", "permute", "cat/copy", "zero-fill", "AdamW", "elementwise", "overhead"]
        print("\n| size | model | CPU ms/step (sys %) | " + " | ".join(short) + " |")
        print("|" + "---|" * (3 + len(short)))
        for r in summary:
            pt = r["profiled_ms"]
            print(f"| {r['size']} | {r['model']} | {r['cpu_ms']:,.0f} ({100 * r['sys_ms'] / r['cpu_ms']:.0f}%) | "
                  + " | ".join(f"{100 * r['categories'].get(lb, 0) / pt:.0f}%" for lb in labels_) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
