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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .artifacts import header, read_json, read_manifest, write_json
from .data import PackedDataset, subset_domains
from .demo import DemoConfig, Stages
from .errors import GrouterError
from .report import report


REPRODUCE_FORMAT, REPRODUCE_VERSION = "grouter-reproduce", 1


@dataclass
class ReproduceConfig(DemoConfig):
    max_bytes_per_domain: int | None = 8_000_000  # the whole default corpus (prose has 7.2 MB)
    vocab_size: int = 8192
    source_steps: int = 1200
    distill_steps: int = 1000
    tune_tokens: int = 500_000
    target_steps: int = 1000
    baselines: tuple[str, ...] = ("aux", "zloss", "auxfree", "hash", "random", "stablemoe", "none")
    held_out_domain: str = "code"
    fold_ablation: tuple[str, ...] = ("random", "balance")
    causal_ablation: bool = True
    data: str | None = None  # a prepared dataset (`grouter data prepare/tokenize`) instead of the embedded corpus


# Documented sizes. "cpu" is sized for a CPU machine (its time is in docs/RESULTS.md); "gpu"
# scales models and tokens up for one GPU (16M tokens per target run, about 2.7 epochs of the
# embedded corpus, so pass a bigger corpus with --data there); "smoke" checks that every stage runs.
SCALES: dict[str, ReproduceConfig] = {
    "smoke": ReproduceConfig(max_bytes_per_domain=300_000, vocab_size=2048, seq_len=64,
                             source=dict(d_model=64, n_layers=2, n_heads=2, d_expert=32, n_experts=16, top_k=2),
                             source_steps=60, grouter=dict(d_model=64, n_layers=1, n_heads=2, d_ff=128),
                             distill_steps=60, target_experts=8, tune_tokens=20_000,
                             target=dict(d_model=64, n_layers=2, n_heads=2, d_expert=32), target_steps=60,
                             batch_size=8, eval_every=20),
    "cpu": ReproduceConfig(),
    "gpu": ReproduceConfig(seq_len=256, source=dict(d_model=512, n_layers=8, n_heads=8, d_expert=256, n_experts=64,
                                                    top_k=8),
                           source_steps=2000, grouter=dict(d_model=256, n_layers=3, n_heads=4, d_ff=512),
                           distill_steps=3000, target_experts=32, tune_tokens=2_000_000,
                           target=dict(d_model=384, n_layers=8, n_heads=6, d_expert=256), target_steps=2000,
                           batch_size=32, eval_every=100),
}


def run_reproduce(out: str | Path, cfg: ReproduceConfig = SCALES["cpu"]) -> dict:
    t0 = time.perf_counter()
    stages = Stages(Path(out), cfg, "reproduce")
    data, source_data = held_out_data(stages, cfg)
    seen = source_data.domains
    targets = stages.source_targets(source_data)

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
    result = report(runs, stages.out / "report", overwrite=True)
    summary = summarize(stages, cfg, data, seen, distilled_summaries, grouter, folds, result)
    summary["seconds_this_invocation"] = time.perf_counter() - t0
    write_json(stages.out / "reproduce.json", summary)
    (stages.out / "reproduce.md").write_text(reproduce_markdown(summary, result["table"]))
    print(headline(summary))
    print(f"report: {stages.out / 'reproduce.md'} (plots and tables in {stages.out / 'report'})")
    return summary


def held_out_data(stages: Stages, cfg: ReproduceConfig) -> tuple[PackedDataset, PackedDataset]:
    """The targets' data (every domain) and the source's (every domain but the held-out one), each
    prepared once under ``stages.out`` (the targets' is the user's ``cfg.data`` when given)."""
    data = stages.data(Path(cfg.data) if cfg.data else None)
    if cfg.held_out_domain not in data.domains or len(data.domains) < 2:
        raise GrouterError(f"held-out domain {cfg.held_out_domain!r} must be one of the data's domains "
                           f"({', '.join(data.domains)}), with at least one other left for the source")
    seen = [d for d in data.domains if d != cfg.held_out_domain]
    source_data = PackedDataset.open(stages.once("data-source", f"the source's data: {', '.join(seen)} only",
                                                 lambda p: subset_domains(data, seen, p)))
    return data, source_data


def summarize(stages: Stages, cfg: ReproduceConfig, data: PackedDataset, seen: list[str], distilled: dict,
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
            f"{summary['train_tokens_available']:,}-token training split, same data order.", "",
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


def scaled(scale: str, **overrides) -> ReproduceConfig:
    if scale not in SCALES:
        raise GrouterError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return replace(SCALES[scale], **overrides)
