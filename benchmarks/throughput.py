"""Training throughput of the built-in MoELM vs Hugging Face Qwen3MoeForCausalLM, same configuration.

One training step = forward + backward + AdamW step, on the same batch, the same dtype, the same
device. Both models are built at each size, given the same weights where their layouts agree
(embedding, attention projections, router, experts, lm_head; HF's extra q_norm/k_norm stay at 1),
warmed up, then timed in interleaved rounds (A B, B A, A B, ...) so that machine noise hits both.
Reports median tokens/s per model and the ratio built-in / HF.

    python benchmarks/throughput.py                       # all sizes, CPU or CUDA (auto)
    python benchmarks/throughput.py --sizes tiny,small --steps 10 --json out.json
    python benchmarks/throughput.py --hf-experts grouped_mm,eager   # also HF's eager expert loop
    python benchmarks/throughput.py --builtin-experts current,select,grouped_mm   # other expert paths

The HF model runs with its default expert implementation (``grouped_mm`` in transformers 5.x,
``torch.nn.functional.grouped_mm``, which has CPU and CUDA kernels in torch >= 2.9); ``--hf-experts``
selects others (``eager`` = HF's per-expert Python loop, ``batched_mm``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import types
from pathlib import Path

import torch

from grouter.model import MoEConfig, MoELM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experts import EXPERT_PATCHES  # noqa: E402  (other Experts.forward versions, opt-in)


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    n_heads: int
    n_experts: int
    top_k: int
    d_expert: int
    vocab_size: int = 8192


SIZES = {
    "tiny": Size(d_model=128, n_layers=2, n_heads=4, n_experts=8, top_k=2, d_expert=128),
    "small": Size(d_model=256, n_layers=4, n_heads=4, n_experts=16, top_k=2, d_expert=256),
    # Tiny-Qwen3 ratio (hidden 384, ffn 344, many small experts); 64 experts top-8 instead of 128.
    "medium": Size(d_model=384, n_layers=4, n_heads=6, n_experts=64, top_k=8, d_expert=344),
}


def builtin_model(s: Size, seq: int, experts: str = "current") -> MoELM:
    """The built-in model; ``experts`` other than "current" swaps in another Experts.forward (benchmarks/experts.py)."""
    cfg = MoEConfig(vocab_size=s.vocab_size, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                    d_expert=s.d_expert, n_experts=s.n_experts, top_k=s.top_k, max_seq_len=seq,
                    router="aux", aux_loss_coef=0.01, seed=0)
    model = MoELM(cfg)
    if experts != "current":
        for blk in model.blocks:
            blk.moe.experts.forward = types.MethodType(EXPERT_PATCHES[experts], blk.moe.experts)
    return model


def hf_model(s: Size, seq: int, experts_impl: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=s.vocab_size, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads, num_key_value_heads=s.n_heads, head_dim=s.d_model // s.n_heads,
        moe_intermediate_size=s.d_expert, intermediate_size=s.d_expert, num_experts=s.n_experts,
        num_experts_per_tok=s.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=False,
        max_position_embeddings=seq, rope_theta=10000.0, rms_norm_eps=1e-6, use_cache=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM._from_config(cfg, attn_implementation="sdpa", experts_implementation=experts_impl)
    return model


@torch.no_grad()
def copy_weights(ours: MoELM, hf) -> None:
    """Give the HF model the built-in model's weights (layouts differ; q_norm/k_norm keep weight 1)."""
    d = ours.cfg.d_model
    hf.model.embed_tokens.weight.copy_(ours.embed.weight)
    hf.lm_head.weight.copy_(ours.lm_head.weight)
    hf.model.norm.weight.copy_(ours.norm.weight)
    for blk, layer in zip(ours.blocks, hf.model.layers):
        q, k, v = blk.attn.qkv.weight.split(d, dim=0)
        layer.self_attn.q_proj.weight.copy_(q)
        layer.self_attn.k_proj.weight.copy_(k)
        layer.self_attn.v_proj.weight.copy_(v)
        layer.self_attn.o_proj.weight.copy_(blk.attn.out.weight)
        layer.input_layernorm.weight.copy_(blk.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(blk.moe_norm.weight)
        layer.mlp.gate.weight.copy_(blk.moe.router.gate.weight)
        layer.mlp.experts.gate_up_proj.copy_(blk.moe.experts.w_in.transpose(1, 2))  # [E,d,2f] -> [E,2f,d]
        layer.mlp.experts.down_proj.copy_(blk.moe.experts.w_out.transpose(1, 2))  # [E,f,d] -> [E,d,f]


def param_report(ours: MoELM, hf, s: Size) -> dict:
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    qk_norm = sum(p.numel() for n, p in hf.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight")))
    return {"builtin": n_ours, "hf": n_hf, "hf_qk_norm": qk_norm,
            "match_without_qk_norm": n_hf - qk_norm == n_ours}


OPTIMIZERS = {  # AdamW as torch picks it (for-loop on CPU, foreach on CUDA), or forced foreach / fused kernels
    "adamw": {}, "adamw-foreach": {"foreach": True}, "adamw-fused": {"fused": True},
}


def make_step(model, kind: str, ids: torch.Tensor, labels_builtin: torch.Tensor, autocast, optimizer="adamw"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **OPTIMIZERS[optimizer])

    def step() -> float:
        with autocast():
            if kind == "builtin":
                loss = model(ids, labels=labels_builtin).loss
            else:  # HF shifts the labels itself; adds router_aux_loss_coef * aux to the loss
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # also synchronises CUDA

    return step


def timed(step, device: torch.device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


# wall: elapsed time (what a user waits for). cpu: CPU time of this process, all its threads; with
# --threads 1 it is the work a step takes, not counting time lost to other processes on a shared machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_size(name: str, s: Size, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    ours = builtin_model(s, args.seq)
    models = {"builtin": ours}
    for impl in args.builtin_experts:
        if impl != "current":
            models[f"builtin[{impl}]"] = m = builtin_model(s, args.seq, impl)
            m.load_state_dict(ours.state_dict())
    for impl in args.hf_experts:
        hf = hf_model(s, args.seq, impl)
        copy_weights(ours, hf)
        models[f"hf[{impl}]"] = hf
    params = param_report(ours, models[f"hf[{args.hf_experts[0]}]"], s)
    for m in models.values():
        m.to(device).train()

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, s.vocab_size, (args.batch, args.seq), generator=g).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # the built-in model does not shift; HF does
    use_bf16 = args.dtype == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    steps = {k: make_step(m, "hf" if k.startswith("hf") else "builtin", ids, labels, autocast, args.optimizer)
             for k, m in models.items()}

    first_loss = {}
    for k, step in steps.items():  # warm-up (allocator, kernels, optimizer state)
        for i in range(args.warmup):
            loss = step()
            if i == 0:
                first_loss[k] = loss
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(args.steps):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            times[k].append(timed(steps[k], device, CLOCKS[args.clock]))

    tokens = args.batch * args.seq
    res = {"size": name, **s.__dict__, "params": params, "first_loss": first_loss, "models": {}}
    for k, ts in times.items():
        med = statistics.median(ts)
        res["models"][k] = {"median_s": med, "tokens_per_s": tokens / med,
                            "min_s": min(ts), "max_s": max(ts), "times_s": ts}
    hf_tps = {k: v["tokens_per_s"] for k, v in res["models"].items() if k.startswith("hf")}
    res["ratio"] = {f"{b}/{h}": res["models"][b]["tokens_per_s"] / t
                    for b in res["models"] if b.startswith("builtin") for h, t in hf_tps.items()}
    return res


def markdown(results: list[dict], hf_keys: list[str]) -> str:
    """One row per size and built-in variant: median tok/s (fastest step in brackets), ratio to each HF variant."""
    head = ["size", "d/L/E/k/f", "params built-in / HF", "model", "tok/s median (best)"]
    head += [f"vs {k}" for k in hf_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def tps(m):
        return f"{m['tokens_per_s']:,.0f} ({m['tokens_per_s'] * m['median_s'] / m['min_s']:,.0f})"

    for r in results:
        p = r["params"]
        first = [r["size"], f"{r['d_model']}/{r['n_layers']}/{r['n_experts']}/{r['top_k']}/{r['d_expert']}",
                 f"{p['builtin'] / 1e6:.2f}M / {p['hf'] / 1e6:.2f}M"]
        for name, m in r["models"].items():
            row = first + [name, tps(m)]
            for k in hf_keys:
                row.append(f"**{r['ratio'][f'{name}/{k}']:.2f}x**" if name.startswith("builtin") else
                           ("1.00x" if name == k else f"{m['tokens_per_s'] / r['models'][k]['tokens_per_s']:.2f}x"))
            lines.append("| " + " | ".join(row) + " |")
            first = ["", "", ""]
    return "\n".join(lines)


def malloc_keep() -> None:
    """glibc serves blocks above its mmap threshold (at most 32 MiB) with mmap and unmaps them on free, so
    each new large tensor starts as fresh pages: one page fault (and kernel zeroing) per 4 KiB on first
    touch. With mmap off and a huge trim threshold, freed memory stays in the heap and is reused."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 40)):
        raise SystemExit("mallopt failed (not glibc?)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small,medium", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (interleaved rounds)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                    help="fp32, or bf16 autocast (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--hf-experts", default="grouped_mm",
                    help="comma list of HF experts_implementation to time (grouped_mm = HF default, eager, batched_mm)")
    ap.add_argument("--builtin-experts", default="current",
                    help="comma list: current (the model as it is) and/or proposed Experts.forward patches "
                         f"({', '.join(EXPERT_PATCHES)}) from benchmarks/experts.py, timed as extra models")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                    help="AdamW implementation, the same for both models (default: torch's default choice)")
    ap.add_argument("--malloc-keep", action="store_true",
                    help="glibc (Linux) only: mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 TiB) at start, so freed large "
                         "blocks stay in the heap instead of going back to the OS and page-faulting on every reuse")
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a busy shared CPU)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.hf_experts = [x.strip() for x in args.hf_experts.split(",") if x.strip()]
    args.builtin_experts = [x.strip() for x in args.builtin_experts.split(",") if x.strip()]
    bad = [x for x in args.builtin_experts if x != "current" and x not in EXPERT_PATCHES]
    if bad:
        ap.error(f"unknown --builtin-experts {bad}; choose from current, {', '.join(EXPERT_PATCHES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_keep:
        malloc_keep()
    unknown = [x for x in args.sizes.split(",") if x not in SIZES]
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")

    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"{cpu_name()}, {os.cpu_count()} CPUs", "threads": torch.get_num_threads(),
           "dtype": args.dtype, "clock": args.clock, "optimizer": args.optimizer,
           "malloc_keep": args.malloc_keep, "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
           "command": " ".join(["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"# torch {env['torch']}, transformers {env['transformers']}, {device} ({env['device_name']}), "
          f"{env['threads']} threads, {args.clock} clock, {args.dtype}, {args.optimizer}, batch {args.batch} x {args.seq} tokens"
          + (", glibc malloc keeps freed memory (--malloc-keep)" if args.malloc_keep else ""), flush=True)
    results = []
    for name in args.sizes.split(","):
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        r = bench_size(name, SIZES[name], args, device)
        r["load_avg_1min_before_after"] = [load0, os.getloadavg()[0]]
        p = r["params"]
        print(f"{name}: params built-in {p['builtin']:,}, HF {p['hf']:,} (HF has {p['hf_qk_norm']:,} more: q_norm/k_norm "
              f"weights; equal otherwise: {p['match_without_qk_norm']}); first loss {r['first_loss']}; "
              + ", ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s" for k, v in r["models"].items())
              + f"  [{time.perf_counter() - t0:.0f}s, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}]", flush=True)
        results.append(r)
    hf_keys = [f"hf[{k}]" for k in args.hf_experts]
    print()
    print(markdown(results, hf_keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
