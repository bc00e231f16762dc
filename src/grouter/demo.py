"""``grouter demo``: the pipeline, small, on the embedded default corpus, in minutes on a CPU.

Each stage writes its own directory under ``--out`` and is skipped (or resumed) when rerun, so
an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .data import PackedDataset, prepare_default
from .model import MODEL_PRESETS, MoEConfig
from .train import TrainConfig, train


@dataclass
class DemoConfig:
    max_bytes_per_domain: int = 1_500_000
    vocab_size: int = 4096
    seq_len: int = 128
    preset: str = "small"
    steps: int = 120
    batch_size: int = 16
    baselines: tuple[str, ...] = ("aux", "auxfree")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def open_or_prepare(out: Path, cfg: DemoConfig) -> PackedDataset:
    if (out / "meta.json").exists():
        return PackedDataset.open(out)
    _say(f"preparing the embedded corpus in {out}")
    return prepare_default(out, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                           max_bytes_per_domain=cfg.max_bytes_per_domain)


def run_demo(out: Path, cfg: DemoConfig = DemoConfig()) -> dict:
    data = open_or_prepare(out / "data", cfg)
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, eval_every=40, checkpoint_every=40,
                            warmup_steps=10)
    runs = {}
    for router in cfg.baselines:
        _say(f"training a target MoE with the {router!r} router ({cfg.steps} steps)")
        model_cfg = MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router=router,
                              **MODEL_PRESETS[cfg.preset])
        runs[router] = train(data, out / "runs" / router, model_cfg, train_cfg)
    table = ["| router | val loss | MaxVioGlobal | mean batch MaxVio | tokens/s |", "|---|---|---|---|---|"]
    for router, s in runs.items():
        table.append(f"| {router} | {s['final_val_loss']:.3f} | {s['max_vio_global']:.3f} | "
                     f"{s['max_vio_batch_mean']:.3f} | {s['tokens_per_second'] or 0:.0f} |")
    print("\n".join(table))
    return {"data": str(data.path), "runs": {r: s["out"] for r, s in runs.items()},
            "results": {r: {k: s[k] for k in ("final_val_loss", "max_vio_global", "max_vio_batch_mean")}
                        for r, s in runs.items()}}
