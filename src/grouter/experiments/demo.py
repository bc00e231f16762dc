"""``grouter demo``: the whole pipeline, small, on the embedded default corpus, on a CPU.

data → source MoE → capture → distill → fold → tune → dispatch → place → target training with
the Grouter and baselines at equal tokens → report. Its sizes are ``configs/demo.toml``. Each stage
writes its own directory under ``--out`` and is reused (or resumed) when rerun, so an interrupted
demo picks up where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import GrouterError
from ..options import option
from ..place import place
from ..report import report
from ..runner import Output, Stage
from .pipeline import Pipeline, PipelineConfig, load_config


def demo_config(**overrides) -> PipelineConfig:
    return PipelineConfig.from_dict({**load_config("demo"), **overrides})


def demo_kind(out: Path) -> str:
    """The name suffix of the Grouter ``grouter demo --out OUT`` made, for tools that read its artifacts:
    ``-layers-all`` (a head per layer, the default) where its routing store is there, else ``""``
    (``--shared-head``)."""
    for kind in ("-layers-all", ""):
        if (Path(out) / f"routing{kind}" / "manifest.json").is_file():
            return kind
    raise GrouterError(f"{out} holds no demo routing store (routing-layers-all or routing); "
                       f"run `grouter demo --out {out}` first")


def run_demo(out: Path, cfg: PipelineConfig) -> dict:
    pipe = Pipeline(Path(out), cfg, "demo")
    data = pipe.data()
    targets = pipe.source_targets(data, cfg.per_layer_heads)
    distilled, distill_summary = pipe.distilled(targets)
    grouter = pipe.tuned(pipe.folded(distilled, data), data)
    routing = pipe.routing(grouter, data)
    kind = grouter.name.removeprefix("grouter")  # "-layers-all" with per-layer heads: their own plan and run
    target_layers = cfg.target["n_layers"] if cfg.per_layer_heads else None  # per-layer heads: plan every layer
    pipe.stage(f"plan{kind}", f"planning expert parallelism over {cfg.ranks} ranks", place, routing=routing,
               ranks=cfg.ranks, target_layers=target_layers)
    runs = pipe.train_targets(data, {f"grouter{kind}": routing}, cfg.baselines)
    result = report(pipe.out / "report", overwrite=True, runs=runs)
    print(result["table"])
    print(f"report: {pipe.out / 'report' / 'report.md'}")
    return {"data": str(data.path), "source": str(pipe.out / "source"), "targets": str(targets.path),
            "grouter": str(grouter), "routing": str(routing), "plan": str(pipe.out / f"plan{kind}"),
            "runs": {r.name: str(r) for r in runs}, "report": str(pipe.out / "report"),
            "distill_val_topk_recall": distill_summary.get("val_topk_recall"), "speedup": result["speedup"]}


@dataclass
class Inputs:
    """The demo reads nothing but the embedded corpus."""


@dataclass
class Options:
    shared_head: bool = option(False, "one Grouter head, distilled from the source's first MoE layer, instead of a "
                               "head per source layer (the default, the study's best); its stages and run are named "
                               "without -layers-all, beside the per-layer ones in the same --out")


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    return run_demo(out.path or Path("demo"), replace(demo_config(), per_layer_heads=not o.shared_head))


demo = Stage("demo", run, Inputs, Options, writes="pipeline")
