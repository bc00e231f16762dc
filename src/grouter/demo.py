"""``grouter demo``: the whole pipeline, small, on the embedded default corpus, on a CPU.

data → source MoE → capture → distill → fold → tune → dispatch → place → target training with
the Grouter and baselines at equal tokens → report. Each stage writes its own directory under
``--out`` and is skipped (or resumed) when rerun, so an interrupted demo picks up where it stopped.
The stage helpers here are shared with ``grouter reproduce``.
"""

from __future__ import annotations

import sys
import time
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
from .loop import TrainConfig, read_run
from .train import external_routing, train
from .tune import TuneConfig, tune


@dataclass
class DemoConfig:
    max_bytes_per_domain: int | None = 1_500_000
    vocab_size: int = 4096
    seq_len: int = 128
    source: dict = field(default_factory=lambda: dict(d_model=128, n_layers=4, n_heads=4, d_expert=64,
                                                      n_experts=32, top_k=4))
    source_steps: int = 250
    grouter: dict = field(default_factory=lambda: dict(d_model=128, n_layers=2, n_heads=4, d_ff=256))
    # "all": a Grouter head per source layer (the study's best, docs/study.md); None: one shared head,
    # the default for now: the benchmarks and recipes in docs/ that read demo/routing were measured with it
    layers: str | None = None
    distill_steps: int = 400
    target_experts: int = 16
    tune_tokens: int = 300_000
    target: dict = field(default_factory=lambda: dict(d_model=128, n_layers=4, n_heads=4, d_expert=64))
    target_steps: int = 200
    batch_size: int = 16
    eval_every: int = 50  # target runs: validation points for the tokens-to-loss curves
    # the strongest fixed routers of the study at this many tokens (random, stablemoe) beside the learned ones
    baselines: tuple[str, ...] = ("aux", "auxfree", "random", "stablemoe")
    ranks: int = 4
    seed: int = 0  # of the target runs (initialisation and data order)


class Stages:
    """Runs the pipeline's stages into one output directory, each once: a stage whose output
    exists is reused, and the stages that resume (training, capture, dispatch) do so."""

    def __init__(self, out: Path, cfg: DemoConfig, tag: str):
        self.out, self.cfg, self.tag = Path(out), cfg, tag
        self.seconds: dict[str, float] = {}  # wall time of the stages run by this invocation

    def say(self, msg: str) -> None:
        print(f"[{self.tag}] {msg}", file=sys.stderr, flush=True)

    def once(self, name: str, what: str, make) -> Path:
        path = self.out / name
        if path.exists():
            self.say(f"{what}: reusing {path}")
        else:
            self.say(what)
            t0 = time.perf_counter()
            make(path)
            self.seconds[name] = time.perf_counter() - t0
        return path

    def timed(self, name: str, what: str, make):
        """A training stage: it resumes, or returns its summary at once when already finished."""
        if (self.out / name / "run.json").exists() and read_run(self.out / name).get("status") == "complete":
            self.say(f"{what}: reusing {self.out / name}")
            return make()
        self.say(what)
        t0 = time.perf_counter()
        result = make()
        self.seconds[name] = time.perf_counter() - t0
        return result

    def data(self, existing: Path | None = None) -> PackedDataset:
        """The embedded corpus, prepared under ``out``, or a dataset the user prepared."""
        if existing is not None:
            return PackedDataset.open(existing)
        cfg = self.cfg
        path = self.once("data", "preparing the embedded corpus",
                         lambda p: prepare_default(p, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                                                   max_bytes_per_domain=cfg.max_bytes_per_domain))
        return PackedDataset.open(path)

    def source_targets(self, data: PackedDataset, layers: str | None = None) -> Targets:
        """Train the source MoE on ``data`` and capture its first-layer router logits (``layers="all"``:
        every layer's, for a Grouter with per-layer heads; its artifacts are named ``...-layers-all``)."""
        cfg = self.cfg
        train_cfg = TrainConfig(steps=cfg.source_steps, batch_size=cfg.batch_size, warmup_steps=20,
                                eval_every=100, checkpoint_every=100)
        model_cfg = MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router="aux", **cfg.source)
        self.timed("source", f"training the source MoE ({model_cfg.n_experts} experts, top-{model_cfg.top_k}) "
                   f"on {', '.join(data.domains)}", lambda: train(data, self.out / "source", model_cfg, train_cfg))
        name, which = ("targets", "first-layer") if layers is None else (f"targets-layers-{layers}", f"{layers} layers'")
        path = self.once(name, f"capturing the source's {which} router logits",
                         lambda p: capture(self.out / "source", data, p, layers=layers))
        return Targets.open(path, data)

    def distilled(self, targets: Targets, causal: bool = True) -> tuple[Path, dict]:
        """``grouter-distilled[-layers-all][-bidirectional]``: the name carries the targets' kind."""
        cfg = self.cfg
        name = "grouter-distilled" + targets.path.name.removeprefix("targets") + ("" if causal else "-bidirectional")
        data = targets.data
        gcfg = GrouterConfig(vocab_size=data.vocab_size, n_experts=targets.n_experts, top_k=targets.top_k,
                             max_seq_len=data.seq_len, causal=causal, **cfg.grouter)
        distill_cfg = DistillConfig(steps=cfg.distill_steps, eval_every=100, checkpoint_every=100)
        kind = "causal" if causal else "bidirectional: leaks the future"
        summary = self.timed(name, f"distilling the Grouter ({kind})",
                             lambda: distill(targets, self.out / name, gcfg, distill_cfg))
        return self.out / name, summary

    def folded(self, distilled: Path, data: PackedDataset, strategy: str = "affinity") -> Path:
        n = self.cfg.target_experts
        name = distilled.name.replace("grouter-distilled", "grouter-folded")
        name += "" if strategy == "affinity" else f"-{strategy}"
        return self.once(name, f"folding {distilled.name} to {n} experts ({strategy})",
                         lambda p: fold(distilled, data, p, n, strategy=strategy))

    def tuned(self, folded: Path, data: PackedDataset, variant: str = "", **options) -> Path:
        """The folded Grouter tuned for balance on ``data``; a ``variant`` (named ``...-tune-VARIANT``) with
        other :class:`TuneConfig` ``options``."""
        name = folded.name.replace("grouter-folded", "grouter") + (f"-tune-{variant}" if variant else "")
        tune_cfg = TuneConfig(tokens=self.cfg.tune_tokens, **options)
        what = f"tuning {folded.name} for balance on the target data" + (f" ({variant})" if variant else "")
        return self.once(name, what, lambda p: tune(folded, data, p, tune_cfg))

    def routing(self, grouter: Path, data: PackedDataset) -> Path:
        name = "routing" + grouter.name.removeprefix("grouter")
        return self.once(name, f"pre-dispatching {grouter.name}: routing store for every sequence",
                         lambda p: dispatch(grouter, data, p))

    def train_target(self, data: PackedDataset, name: str, store: Path | None = None,
                     router: str | None = None) -> Path:
        """One target run, ``out/runs/NAME``: from a routing store, or with a baseline ``router``; the
        schedule, seed (hence data order) and body are the config's, so runs of one config compare at
        equal tokens."""
        cfg, path = self.cfg, self.out / "runs" / name
        train_cfg = TrainConfig(steps=cfg.target_steps, batch_size=cfg.batch_size, warmup_steps=20,
                                eval_every=cfg.eval_every, checkpoint_every=100, seed=cfg.seed)
        if store is not None:
            source, identity, n_experts, k = external_routing(data, routing_dir=store)
            what = f"training the target with {store.name} ({n_experts} experts, top-{k}, seed {cfg.seed})"
            router, extra = "external", dict(routing_source=source, routing_identity=identity)
        else:
            n_experts, k, extra = cfg.target_experts, cfg.source["top_k"], {}
            what = f"training the same target with the {router!r} router, same tokens (seed {cfg.seed})"
        model_cfg = MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, router=router,
                              n_experts=n_experts, top_k=k, **cfg.target)
        self.timed(f"runs/{name}", what, lambda: train(data, path, model_cfg, train_cfg, **extra))
        return path

    def train_targets(self, data: PackedDataset, routed: dict[str, Path], baselines: tuple[str, ...]) -> list[Path]:
        """Target runs at equal tokens and data order: one per routing store, one per baseline router."""
        return ([self.train_target(data, name, store=store) for name, store in routed.items()]
                + [self.train_target(data, router, router=router) for router in baselines])


def run_demo(out: Path, cfg: DemoConfig = DemoConfig()) -> dict:
    stages = Stages(out, cfg, "demo")
    data = stages.data()
    targets = stages.source_targets(data, cfg.layers)
    distilled, distill_summary = stages.distilled(targets)
    grouter = stages.tuned(stages.folded(distilled, data), data)
    routing = stages.routing(grouter, data)
    kind = grouter.name.removeprefix("grouter")  # "-layers-all" with per-layer heads: their own plan and run
    target_layers = cfg.target["n_layers"] if cfg.layers else None  # per-layer heads: plan over every layer
    plan = stages.once(f"plan{kind}", f"planning expert parallelism over {cfg.ranks} ranks",
                       lambda p: place(routing, p, ranks=cfg.ranks, target_layers=target_layers))
    runs = stages.train_targets(data, {f"grouter{kind}": routing}, cfg.baselines)
    result = report(runs, stages.out / "report", overwrite=True)
    print(result["table"])
    print(f"report: {stages.out / 'report' / 'report.md'}")
    return {"data": str(data.path), "source": str(stages.out / "source"), "targets": str(targets.path),
            "grouter": str(grouter), "routing": str(routing), "plan": str(plan),
            "runs": {r.name: str(r) for r in runs}, "report": str(stages.out / "report"),
            "distill_val_topk_recall": distill_summary.get("val_topk_recall"), "speedup": result["speedup"]}
