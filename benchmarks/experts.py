"""Ways to compute the MoE experts for one fixed routing, forward + backward.

All variants compute, for x [T, d], routing ids/weights [T, k], stacked SwiGLU weights
w_in [E, d, 2f] (gate | up) and w_out [E, f, d]:

    y[t] = sum_j weights[t, j] * (silu(x[t] @ w_in[e, :, :f]) * (x[t] @ w_in[e, :, f:])) @ w_out[e],  e = ids[t, j]

and the gradients w.r.t. x, w_in, w_out and the routing weights. Variants:

  current       grouter.model.Experts as it is installed (the reference of the checks): sort slots by expert,
                loop over experts over ``w_in.unbind(0)``, combine with index_add_
  loop_select   the loop as it was before the unbind fix, ``w_in[e]`` per expert: autograd builds one full-size
                [E, d, 2f] zero gradient per expert (unbind: a single stack)
  loop_unbind   this file's copy of the unbind loop (sort + loop + index_add_)
  loop_unbind_sum  loop_unbind, combining with an inverse permutation + view(T, k, d).sum(1) instead of index_add_
  loop_fn       the loop inside one torch.autograd.Function: matmuls write into preallocated buffers
                (mm out=), activation and its derivative once over all slots, weight grads in place
  padded_bmm    scatter slots into [E, capacity, d] (capacity = the largest expert's load), two torch.bmm
  grouped_mm    torch.nn.functional.grouped_mm / torch._grouped_mm over the sorted slots (CPU kernel since torch 2.9)
  grouped_mm_sum  grouped_mm with the inverse-permutation combine
  grouped_mm_isel grouped_mm with index_select for the gather (backward: index_add_ instead of index_put_)
  dense         every expert on every token, masked (E/k times the FLOPs; reference only, small shapes)

Outputs and gradients are checked against ``current`` (allclose) before timing. Timing: warm-up, then
the variants' runs interleaved round by round, median reported.

    python benchmarks/experts.py
    python benchmarks/experts.py --shapes 2048x64x8x384x344 --reps 10 --json experts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from grouter.model import Experts
from grouter.routers import Routing, topk_gating

SHAPES = [  # tokens x E x k x d x f
    (2048, 8, 2, 128, 128),
    (2048, 16, 2, 256, 256),
    (2048, 32, 4, 384, 344),
    (2048, 64, 8, 384, 344),
    (2048, 128, 8, 384, 344),
]


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ----------------------------------------------------------------------------------------------- variants
def v_current(x, ids, w, w_in, w_out, module):
    return module(x, Routing(ids, w))[0]


def v_loop_select(x, ids, w, w_in, w_out, module):
    return forward_select(module, x, Routing(ids, w))[0]


def _sort(ids, n_experts):
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return k, order, counts, order // k


def _combine_index_add(x, ys, token_of_slot):
    return torch.zeros_like(x).index_add_(0, token_of_slot, ys)


def _combine_sum(x, ys, order, k):
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return ys[inv].view(x.shape[0], k, x.shape[1]).sum(1)


def _loop(xs, counts, w_in, w_out):
    outs = []
    for chunk, wi, wo in zip(xs.split(counts.tolist()), w_in.unbind(0), w_out.unbind(0)):
        if chunk.shape[0] == 0:
            continue
        gate, up = (chunk @ wi).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ wo)
    return torch.cat(outs)


def v_loop_fn(x, ids, w, w_in, w_out, module):
    return forward_fn(module, x, Routing(ids, w))[0]


def v_loop_unbind(x, ids, w, w_in, w_out, module=None):
    k, order, counts, tos = _sort(ids, w_in.shape[0])
    ys = _loop(x[tos], counts, w_in, w_out) * w.reshape(-1)[order, None]
    return _combine_index_add(x, ys, tos)


def v_loop_unbind_sum(x, ids, w, w_in, w_out, module=None):
    k, order, counts, tos = _sort(ids, w_in.shape[0])
    ys = _loop(x[tos], counts, w_in, w_out) * w.reshape(-1)[order, None]
    return _combine_sum(x, ys, order, k)


def _grouped(xs, counts, w_in, w_out):
    gmm = _grouped_mm_fn()
    offs = counts.cumsum(0).to(torch.int32)
    gate, up = gmm(xs, w_in, offs=offs).chunk(2, dim=-1)
    return gmm(F.silu(gate) * up, w_out, offs=offs)


def v_grouped_mm(x, ids, w, w_in, w_out, module=None):
    k, order, counts, tos = _sort(ids, w_in.shape[0])
    ys = _grouped(x[tos], counts, w_in, w_out) * w.reshape(-1)[order, None]
    return _combine_index_add(x, ys, tos)


def v_grouped_mm_sum(x, ids, w, w_in, w_out, module=None):
    k, order, counts, tos = _sort(ids, w_in.shape[0])
    ys = _grouped(x[tos], counts, w_in, w_out) * w.reshape(-1)[order, None]
    return _combine_sum(x, ys, order, k)


def v_grouped_mm_isel(x, ids, w, w_in, w_out, module=None):
    k, order, counts, tos = _sort(ids, w_in.shape[0])
    ys = _grouped(x.index_select(0, tos), counts, w_in, w_out) * w.reshape(-1).index_select(0, order)[:, None]
    return _combine_index_add(x, ys, tos)


def v_padded_bmm(x, ids, w, w_in, w_out, module=None):
    n_experts, d = w_in.shape[0], x.shape[1]
    k, order, counts, tos = _sort(ids, n_experts)
    cap = int(counts.max())
    starts = counts.cumsum(0) - counts
    sorted_e = ids.reshape(-1)[order]
    slot_row = sorted_e * cap + (torch.arange(order.numel(), device=x.device) - starts[sorted_e])
    xp = x.new_zeros(n_experts * cap, d).index_copy(0, slot_row, x[tos]).view(n_experts, cap, d)
    gate, up = torch.bmm(xp, w_in).chunk(2, dim=-1)
    yp = torch.bmm(F.silu(gate) * up, w_out).view(n_experts * cap, d)
    ys = yp.index_select(0, slot_row) * w.reshape(-1)[order, None]
    return _combine_index_add(x, ys, tos)


def v_dense(x, ids, w, w_in, w_out, module=None):
    n_experts = w_in.shape[0]
    gate, up = torch.einsum("td,edh->eth", x, w_in).chunk(2, dim=-1)
    y_all = torch.einsum("etf,efd->etd", F.silu(gate) * up, w_out)  # [E, T, d]
    dense_w = x.new_zeros(x.shape[0], n_experts).scatter_add(1, ids, w)  # [T, E]
    return torch.einsum("etd,te->td", y_all, dense_w)


# ------------------------------------------------------------------ drop-in replacements for Experts.forward
def _grouping(self, routing):
    """(order, counts) from the routing, precomputed by the data loader when the Routing carries them."""
    if getattr(routing, "order", None) is not None:
        return routing.order, routing.counts
    flat_ids = routing.ids.reshape(-1)
    return flat_ids.argsort(stable=True), torch.bincount(flat_ids, minlength=self.n_experts)


def forward_select(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts.forward as it was before the unbind fix: ``self.w_in[e]`` inside the loop.

    Autograd then builds, per expert, a zero-filled full-size [E, d, 2f] gradient for ``w_in[e]`` and
    adds them all up: O(E^2 d f) memory traffic per layer. Kept to measure what the fix is worth.
    """
    k = routing.ids.shape[-1]
    order, counts = _grouping(self, routing)
    token_of_slot = order // k
    xs = x[token_of_slot]
    outputs = []
    for e, chunk in enumerate(xs.split(counts.tolist())):
        if chunk.shape[0] == 0:
            continue
        gate, up = (chunk @ self.w_in[e]).chunk(2, dim=-1)
        outputs.append((F.silu(gate) * up) @ self.w_out[e])
    ys = torch.cat(outputs) * routing.weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_slot, ys), counts


def forward_grouped_mm(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts.forward with one grouped GEMM per projection (torch >= 2.9), no host sync, no Python loop.

    Falls back to the model's own loop where grouped_mm is missing or (CUDA) the GPU is older than
    SM80, the same rule as transformers' ``_can_use_grouped_mm``.
    """
    gmm = _grouped_mm_fn()
    if gmm is None or (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0)):
        return type(self).forward(self, x, routing)
    k = routing.ids.shape[-1]
    order, counts = _grouping(self, routing)
    offs = counts.cumsum(0).to(torch.int32)
    token_of_slot = order // k
    xs = x[token_of_slot].to(self.w_in.dtype)
    gate, up = gmm(xs, self.w_in, offs=offs).chunk(2, dim=-1)
    ys = gmm(F.silu(gate) * up, self.w_out, offs=offs)
    ys = ys * routing.weights.reshape(-1)[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_slot, ys.to(x.dtype)), counts


class LoopSwiGLU(torch.autograd.Function):
    """The per-expert loop as one autograd node: forward and backward matmuls write straight into
    preallocated buffers (``torch.mm(out=...)``), the activation and its derivative run once over all
    slots instead of once per expert, weight gradients land in place (no unbind/stack, no chunk/cat).
    xs: [S, d] slots sorted by expert; counts: python list of slots per expert."""

    @staticmethod
    def forward(ctx, xs, w_in, w_out, counts):
        f = w_out.shape[1]
        h = xs.new_empty(xs.shape[0], 2 * f)
        bounds = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                bounds.append((e, start, start + n))
                torch.mm(xs[start:start + n], w_in[e], out=h[start:start + n])
            start += n
        act = F.silu(h[:, :f]) * h[:, f:]
        y = xs.new_empty(xs.shape[0], w_out.shape[2])
        for e, a, b in bounds:
            torch.mm(act[a:b], w_out[e], out=y[a:b])
        ctx.save_for_backward(xs, w_in, w_out, h)
        ctx.bounds = bounds
        return y

    @staticmethod
    def backward(ctx, gy):
        xs, w_in, w_out, h = ctx.saved_tensors
        f = w_out.shape[1]
        gy = gy.contiguous()
        gate, up = h[:, :f], h[:, f:]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        g_act = torch.empty_like(act)
        g_w_out = torch.zeros_like(w_out)
        for e, a, b in ctx.bounds:
            torch.mm(gy[a:b], w_out[e].t(), out=g_act[a:b])
            torch.mm(act[a:b].t(), gy[a:b], out=g_w_out[e])
        g_h = torch.empty_like(h)
        torch.mul(g_act, silu, out=g_h[:, f:])
        torch.mul(g_act * up, sig * (1 + gate * (1 - sig)), out=g_h[:, :f])
        g_x = torch.empty_like(xs)
        g_w_in = torch.zeros_like(w_in)
        for e, a, b in ctx.bounds:
            torch.mm(g_h[a:b], w_in[e].t(), out=g_x[a:b])
            torch.mm(xs[a:b].t(), g_h[a:b], out=g_w_in[e])
        return g_x, g_w_in, g_w_out, None


def forward_fn(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts.forward with the loop inside one autograd.Function (:class:`LoopSwiGLU`)."""
    k = routing.ids.shape[-1]
    order, counts = _grouping(self, routing)
    token_of_slot = order // k
    ys = LoopSwiGLU.apply(x[token_of_slot], self.w_in, self.w_out, counts.tolist())
    ys = ys * routing.weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_slot, ys), counts


# timed as extra built-in models by throughput.py --builtin-experts
EXPERT_PATCHES = {"select": forward_select, "grouped_mm": forward_grouped_mm, "fn": forward_fn}


VARIANTS = {
    "current": v_current,
    "loop_select": v_loop_select,
    "loop_unbind": v_loop_unbind,
    "loop_unbind_sum": v_loop_unbind_sum,
    "loop_fn": v_loop_fn,
    "padded_bmm": v_padded_bmm,
    "grouped_mm": v_grouped_mm,
    "grouped_mm_sum": v_grouped_mm_sum,
    "grouped_mm_isel": v_grouped_mm_isel,
    "dense": v_dense,
}


def grouped_mm_status(device: torch.device) -> str:
    fn = _grouped_mm_fn()
    if fn is None:
        return "absent in this torch"
    try:
        x = torch.randn(6, 8, device=device, requires_grad=True)
        wt = torch.randn(2, 8, 4, device=device, requires_grad=True)
        y = fn(x, wt, offs=torch.tensor([2, 6], dtype=torch.int32, device=device))
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:2] @ wt[0], x[2:] @ wt[1]])
        ok = torch.allclose(y, ref, atol=1e-5)
        return f"works on {device.type} float32 (forward and backward){'' if ok else ' but WRONG result'}"
    except Exception as e:  # noqa: BLE001
        return f"fails on {device.type}: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


# ----------------------------------------------------------------------------------------------- harness
def make_problem(T, E, k, d, f, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    logits = torch.randn(T, E, generator=g)
    module = Experts(E, d, f)
    with torch.no_grad():
        module.w_in.copy_(torch.randn(E, d, 2 * f, generator=g) * 0.02)
        module.w_out.copy_(torch.randn(E, f, d, generator=g) * 0.02)
    grad_y = torch.randn(T, d, generator=g)
    module = module.to(device)
    r = topk_gating(logits.to(device), k)
    return x.to(device), logits.to(device), r.ids, module, grad_y.to(device)


def run_variant(fn, x0, logits, ids, module, grad_y, k):
    """One forward + backward; returns (y, grads) with fresh leaves each time."""
    x = x0.detach().clone().requires_grad_(True)
    lg = logits.detach().clone().requires_grad_(True)
    w = lg.gather(-1, ids).softmax(-1)  # gate weights carry a gradient, as in training
    module.zero_grad(set_to_none=True)
    y = fn(x, ids, w, module.w_in, module.w_out, module)
    y.backward(grad_y)
    return y.detach(), (x.grad, lg.grad, module.w_in.grad, module.w_out.grad)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_shape(shape, names, reps, warmup, device, dense_max_flops_ratio, clock=time.perf_counter):
    T, E, k, d, f = shape
    x, logits, ids, module, grad_y = make_problem(T, E, k, d, f, device)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    y_ref, g_ref = run_variant(v_current, x, logits, ids, module, grad_y, k)
    checks, usable = {}, []
    for n in names:
        if n == "dense" and E / k > dense_max_flops_ratio:
            checks[n] = f"skipped (E/k = {E / k:.0f}x the FLOPs)"
            continue
        try:
            y, gr = run_variant(VARIANTS[n], x, logits, ids, module, grad_y, k)
        except Exception as e:  # noqa: BLE001
            checks[n] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
            continue
        errs = [(y - y_ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(gr, g_ref)]
        ok = torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5) and all(
            torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(gr, g_ref))
        checks[n] = f"{'ok' if ok else 'MISMATCH'} (max abs err y {errs[0]:.1e}, grads {max(errs[1:]):.1e})"
        if ok:
            usable.append(n)
    for n in usable:
        for _ in range(warmup):
            run_variant(VARIANTS[n], x, logits, ids, module, grad_y, k)
    times = {n: [] for n in usable}
    for r in range(reps):
        for n in (usable if r % 2 == 0 else usable[::-1]):
            sync(device)
            t0 = clock()
            run_variant(VARIANTS[n], x, logits, ids, module, grad_y, k)
            sync(device)
            times[n].append(clock() - t0)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    return {"shape": dict(tokens=T, E=E, k=k, d=d, f=f), "load_min_max": [int(counts.min()), int(counts.max())],
            "checks": checks, "median_ms": {n: 1e3 * v for n, v in med.items()},
            "speedup_vs_current": {n: med["current"] / v for n, v in med.items()} if "current" in med else {},
            "times_s": times}


def markdown(results, names):
    head = ["tokens x E x k x d x f", "load min/max"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["shape"]
        row = [f"{s['tokens']}x{s['E']}x{s['k']}x{s['d']}x{s['f']}", "{}/{}".format(*r["load_min_max"])]
        for n in names:
            if n in r["median_ms"]:
                sp = r["speedup_vs_current"].get(n)
                row.append(f"{r['median_ms'][n]:.1f} ms" + (f" ({sp:.2f}x)" if sp and n != "current" else ""))
            else:
                row.append("—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None, help="comma list of TxExkxdxf (default: a built-in list)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--dense-max", type=float, default=4.0, help="run 'dense' only where E/k <= this")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a busy shared CPU)")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}")
    if "current" not in names:
        names.insert(0, "current")
    gstat = grouped_mm_status(device)
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "python": platform.python_version(), "grouped_mm": gstat, "dtype": "float32", "clock": args.clock,
           "command": " ".join(["python", "benchmarks/experts.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"# torch {env['torch']}, {device}, {env['threads']} threads, {args.clock} clock, float32; grouped_mm: {gstat}", flush=True)
    results = []
    for shape in shapes:
        t0 = time.perf_counter()
        r = bench_shape(shape, names, args.reps, args.warmup, device, args.dense_max, CLOCKS[args.clock])
        print(f"{'x'.join(map(str, shape))}: " + "; ".join(f"{n}: {c}" for n, c in r["checks"].items())
              + f"  [{time.perf_counter() - t0:.0f}s]", flush=True)
        results.append(r)
    print()
    print(markdown(results, names))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
