"""``grouter reproduce``: the paper's comparison (docs/method.md#baselines) at a size this machine can run.

The source MoE and its Grouter see every domain of the corpus but one (``held_out_domain``); the
targets train on all domains. Validation on the held-out domain therefore measures routing on
text the source never saw; only the head-only balance tuning meets target data, as in the paper.

Target runs, all at equal tokens and identical data order:
- ``grouter``: causal Grouter, affinity-folded, tuned (the method);
- ``grouter-raw``: the same Grouter before tuning;
- baselines ``aux``, ``zloss``, ``auxfree``, ``hash``, ``random`` (a frozen random router), ``none``;
- ablations: ``grouter-bidirectional`` (distilled without the causal mask: how much of any gain
  is future leakage) and ``grouter-raw-fold-random`` / ``-balance`` (folding strategy, untuned
  so that tuning cannot hide the differences; compare with ``grouter-raw``, which is affinity).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifacts import header, read_json, read_manifest, write_json
from ..errors import GrouterError
from ..formats.dataset import PackedDataset
from ..options import POSITIVE_INT, option, path_input
from ..report import report
from ..runner import Output, Stage
from .pipeline import Pipeline, PipelineConfig, held_out_data, load_config, scaled
from .study import run_study, study_config

REPRODUCE_FORMAT, REPRODUCE_VERSION = "grouter-reproduce", 1
SCALES = tuple(load_config("reproduce")["scales"])


def reproduce_config(scale: str = "cpu", **overrides) -> PipelineConfig:
    """``configs/reproduce.toml`` at ``scale`` ("smoke": every stage runs, in minutes; "cpu": sized for a
    CPU machine; "gpu": one GPU), with ``overrides``."""
    return PipelineConfig.from_dict(scaled(load_config("reproduce"), scale, **overrides))


def run_reproduce(out: str | Path, cfg: PipelineConfig) -> dict:
    t0 = time.perf_counter()
    stages = Pipeline(Path(out), cfg, "reproduce")
    data, source_data = held_out_data(stages, cfg)
    seen = source_data.domains
    targets = stages.source_targets(source_data, cfg.per_layer_heads)

    distilled, distill_summary = stages.distilled(targets)
    affinity = stages.folded(distilled, source_data)
    grouter = stages.tuned(affinity, data)
    routed = {"grouter": stages.routing(grouter, data), "grouter-raw": stages.routing(affinity, data)}
    distilled_summaries = {"causal": distill_summary}
    if cfg.causal_ablation:
        leaky, distilled_summaries["bidirectional"] = stages.distilled(targets, causal=False)
        routed["grouter-bidirectional"] = stages.routing(stages.tuned(stages.folded(leaky, source_data), data), data)
    folds = {"affinity": affinity}
    for strategy in cfg.fold_ablation:
        folds[strategy] = stages.folded(distilled, source_data, strategy)
        routed[f"grouter-raw-fold-{strategy}"] = stages.routing(folds[strategy], data)

    runs = stages.train_targets(data, routed, cfg.baselines)
    result = report(stages.out / "report", overwrite=True, runs=runs)
    summary = summarize(stages, cfg, data, seen, distilled_summaries, grouter, folds, result)
    summary["seconds_this_invocation"] = time.perf_counter() - t0
    write_json(stages.out / "reproduce.json", summary)
    (stages.out / "reproduce.md").write_text(reproduce_markdown(summary, result["table"]))
    print(headline(summary))
    print(f"report: {stages.out / 'reproduce.md'} (plots and tables in {stages.out / 'report'})")
    return summary


def summarize(stages: Pipeline, cfg: PipelineConfig, data: PackedDataset, seen: list[str], distilled: dict,
              grouter: Path, folds: dict[str, Path], result: dict) -> dict:
    """Everything reproduce.md states, in one JSON-able dict (also reproduce.json)."""
    done = stages.out / "reproduce.json"
    previous = read_manifest(stages.out, done.name, REPRODUCE_FORMAT, REPRODUCE_VERSION, "reproduction",
                             "grouter reproduce") if done.exists() else {}
    tokens = cfg.target_steps * cfg.batch_size * data.seq_len
    return {
        **header(REPRODUCE_FORMAT, REPRODUCE_VERSION),
        "config": asdict(cfg),
        "domains": {"source_saw": seen, "held_out": cfg.held_out_domain},
        "target_tokens_per_run": tokens,
        "train_tokens_available": int(data.meta["splits"]["train"]["n_tokens"]),
        "distill": {kind: {k: s.get(k) for k in ("val_topk_recall", "val_topk_set_match", "val_kl", "parameters")}
                    for kind, s in distilled.items()},
        "tune": {k: v for k, v in read_json(grouter / "tune_report.json", "tune report").items()
                 if k in ("max_vio_global_ratio", "topk_set_agreement_with_untuned", "before", "after")},
        "fold": {strategy: read_json(path / "fold_report.json", "fold report")["within_group_affinity"]
                 for strategy, path in folds.items()},
        "speedup_by_domain": result["speedup_by_domain"],
        "stage_seconds": {**previous.get("stage_seconds", {}), **stages.seconds},
    }


def headline(summary: dict) -> str:
    held = summary["domains"]["held_out"]
    lines = []
    for label, key in (("all validation data", "all"), (f"held-out domain '{held}' (never seen by the source)", held)):
        s = summary["speedup_by_domain"].get(key, {})
        g = s.get("runs", {}).get("grouter")
        if g is None:
            continue
        speed = "not reached" if g["speedup"] is None else f"{g['speedup']:.2f}×"
        lines.append(f"Grouter vs best baseline ({s['best_baseline']}) on {label}: tokens-to-loss {speed}, "
                     f"final loss gap {g['final_val_loss_gap']:+.3f}")
    return "\n".join(lines)


def reproduce_markdown(summary: dict, table: str) -> str:
    cfg, held = summary["config"], summary["domains"]["held_out"]
    by_domain = summary["speedup_by_domain"]
    text = ["# grouter reproduce", "",
            f"Source MoE and Grouter trained on **{', '.join(summary['domains']['source_saw'])}** only; "
            f"**{held}** is the held-out domain. Every target run: {summary['target_tokens_per_run']:,} tokens "
            f"({cfg['target_steps']} steps × {cfg['batch_size']} × {cfg['seq_len']}) of the "
            f"{summary['train_tokens_available']:,}-token training split, same data order. The Grouter has "
            + ("a head per source layer." if cfg.get("per_layer_heads") else "one shared head (the source's first "
               "MoE layer's)."), "",
            "## Headline", "", headline(summary), "", "## All runs", "", table, ""]

    def gap(name: str, key: str) -> str:
        v = by_domain.get(key, {}).get("runs", {}).get(name)
        return "–" if v is None else f"{v['final_val_loss_gap']:+.3f}"

    if "grouter-bidirectional" in by_domain.get("all", {}).get("runs", {}):
        text += ["## Ablation: causal vs bidirectional Grouter", "",
                 "The bidirectional Grouter routes each token with the tokens after it, so its routing carries "
                 "information about the labels (docs/method.md#the-grouter-network); any extra gain it shows is leakage, not routing quality.",
                 "", "| Grouter | distill top-k recall | loss gap vs best baseline (all) | (held-out) |",
                 "|---|---|---|---|"]
        for kind, name in (("causal", "grouter"), ("bidirectional", "grouter-bidirectional")):
            text.append(f"| {kind} | {summary['distill'][kind]['val_topk_recall']:.3f} | {gap(name, 'all')} | "
                        f"{gap(name, held)} |")
        text.append("")
    text += ["## Ablation: folding strategy (untuned Grouters)", "",
             "| strategy | co-activation mass inside groups | loss gap vs best baseline (all) | (held-out) |",
             "|---|---|---|---|"]
    for strategy, inside in summary["fold"].items():
        name = "grouter-raw" if strategy == "affinity" else f"grouter-raw-fold-{strategy}"
        text.append(f"| {strategy} | {inside:.3f} | {gap(name, 'all')} | {gap(name, held)} |")
    tune = summary["tune"]
    text += ["", "## Tuning", "",
             f"Held-out MaxVioGlobal {tune['before']['max_vio_global']:.3f} → {tune['after']['max_vio_global']:.3f}; "
             f"identical top-k set kept for {tune['topk_set_agreement_with_untuned']:.1%} of tokens.", "",
             "## Wall time per stage (seconds, on this machine)", "", "| stage | seconds |", "|---|---|"]
    text += [f"| {k} | {v:.1f} |" for k, v in summary["stage_seconds"].items()]
    return "\n".join(text) + "\n"


@dataclass
class Inputs:
    data: Path | None = path_input("a dataset from `grouter data prepare/tokenize` (default: the embedded corpus, "
                                   "prepared in --out)", required=False)


@dataclass
class Options:
    scale: str = option("cpu", "model and data sizes: smoke (minutes), cpu (CPU-sized), gpu (one GPU, not for "
                        "--study); docs/RESULTS.md", choices=SCALES)
    study: str | None = option(None, "vary one factor at a time around a base cell instead: source, tuning, heads, "
                               "tokens, experts, all of them (about 3.7 h at --scale cpu), one cell (FACTOR/KEY) or "
                               "several, comma-separated; docs/study.md", metavar="NAME")
    held_out_domain: str | None = option(None, "the domain the source never sees (default: code)")
    target_steps: int | None = option(None, "override the scale's target steps", range=POSITIVE_INT)
    shared_head: bool = option(False, "one Grouter head (the source's first MoE layer) instead of a head per source "
                               "layer (the default); the study's heads factor compares both")


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    """``grouter reproduce``, or with ``study`` the study (grouter.experiments.study)."""
    overrides = {k: v for k, v in (("held_out_domain", o.held_out_domain), ("target_steps", o.target_steps),
                                   ("data", inputs.data and str(inputs.data))) if v is not None}
    if o.study:
        if o.shared_head:
            raise GrouterError("--shared-head is for grouter reproduce; the study's base cell has one shared head and "
                               "its heads factor a head per layer")
        return run_study(out.path or Path("study"), o.study, study_config(o.scale, **overrides))
    return run_reproduce(out.path or Path("reproduce"), reproduce_config(o.scale, per_layer_heads=not o.shared_head,
                                                                         **overrides))


reproduce = Stage("reproduce", run, Inputs, Options, writes="pipeline")
