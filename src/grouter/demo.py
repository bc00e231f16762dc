"""``grouter demo``: the whole pipeline, small, on the embedded default corpus, on a CPU.

data → source MoE → capture → distill → fold → tune → dispatch → place → target training with
the Grouter and baselines at equal tokens → report. Each stage writes its own directory under
``--out`` and is skipped (or resumed) when rerun, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .capture import Targets, capture
from .data import PackedDataset, prepare_default
from .dispatch import dispatch
from .distill import DistillConfig, distill
from .fold import fold
from .model import MoEConfig
from .network import GrouterConfig
from .place import place
from .report import report
from .train import TrainConfig, external_routing, train
from .tune import TuneConfig, tune


@dataclass
class DemoConfig:
    max_bytes_per_domain: int = 1_500_000
    vocab_size: int = 4096
    seq_len: int = 128
    source: dict = field(default_factory=lambda: dict(d_model=128, n_layers=4, n_heads=4, d_expert=64,
                                                      n_experts=32, top_k=4))
    source_steps: int = 250
    grouter: dict = field(default_factory=lambda: dict(d_model=128, n_layers=2, n_heads=4, d_ff=256))
    distill_steps: int = 400
    target_experts: int = 16
    tune_tokens: int = 300_000
    target: dict = field(default_factory=lambda: dict(d_model=128, n_layers=4, n_heads=4, d_expert=64))
    target_steps: int = 200
    batch_size: int = 16
    baselines: tuple[str, ...] = ("aux", "auxfree")
    ranks: int = 4


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _once(path: Path, what: str, make) -> None:
    """Run a stage unless its finished output is already there (outputs appear atomically)."""
    if path.exists():
        _say(f"{what}: reusing {path}")
    else:
        _say(what)
        make()


def run_demo(out: Path, cfg: DemoConfig = DemoConfig()) -> dict:
    out = Path(out)
    _once(out / "data", "preparing the embedded corpus",
          lambda: prepare_default(out / "data", vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                                  max_bytes_per_domain=cfg.max_bytes_per_domain))
    data = PackedDataset.open(out / "data")
    train_cfg = TrainConfig(steps=cfg.source_steps, batch_size=cfg.batch_size, warmup_steps=20,
                            eval_every=100, checkpoint_every=100)

    _say(f"training the source MoE ({cfg.source['n_experts']} experts, top-{cfg.source['top_k']})")
    train(data, out / "source", MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router="aux",
                                          **cfg.source), train_cfg)
    _once(out / "targets", "capturing the source's first-layer router logits",
          lambda: capture(out / "source", data, out / "targets"))
    targets = Targets.open(out / "targets", data)
    _say("distilling the Grouter (causal)")
    gcfg = GrouterConfig(vocab_size=data.vocab_size, n_experts=targets.n_experts, top_k=targets.top_k,
                         max_seq_len=data.seq_len, **cfg.grouter)
    distilled = distill(targets, out / "grouter-distilled", gcfg,
                        DistillConfig(steps=cfg.distill_steps, eval_every=100, checkpoint_every=100))
    _once(out / "grouter-folded", f"folding {targets.n_experts} → {cfg.target_experts} experts by affinity",
          lambda: fold(out / "grouter-distilled", data, out / "grouter-folded", cfg.target_experts))
    _once(out / "grouter", "tuning the folded Grouter for balance on the target data",
          lambda: tune(out / "grouter-folded", data, out / "grouter", TuneConfig(tokens=cfg.tune_tokens)))
    _once(out / "routing", "pre-dispatching: routing store for every training sequence",
          lambda: dispatch(out / "grouter", data, out / "routing"))
    _once(out / "plan", f"planning expert parallelism over {cfg.ranks} ranks",
          lambda: place(out / "routing", out / "plan", ranks=cfg.ranks))

    target_cfg = TrainConfig(steps=cfg.target_steps, batch_size=cfg.batch_size, warmup_steps=20,
                             eval_every=50, checkpoint_every=100)
    source, identity, n_experts, k = external_routing(data, routing_dir=out / "routing")
    runs = [out / "runs" / "grouter"]
    _say(f"training the target MoE with stored Grouter routing ({n_experts} experts, top-{k})")
    train(data, runs[0], MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router="external",
                                   n_experts=n_experts, top_k=k, **cfg.target),
          target_cfg, routing_source=source, routing_identity=identity)
    for router in cfg.baselines:
        _say(f"training the same target with the {router!r} router, same tokens")
        runs.append(out / "runs" / router)
        train(data, runs[-1], MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router=router,
                                        n_experts=n_experts, top_k=k, **cfg.target), target_cfg)
    result = report(runs, out / "report", overwrite=True)
    print(result["table"])
    print(f"report: {out / 'report' / 'report.md'}")
    return {"data": str(out / "data"), "source": str(out / "source"), "targets": str(out / "targets"),
            "grouter": str(out / "grouter"), "routing": str(out / "routing"), "plan": str(out / "plan"),
            "runs": {r.name: str(r) for r in runs}, "report": str(out / "report"),
            "distill_val_topk_recall": distilled.get("val_topk_recall"), "speedup": result["speedup"]}
