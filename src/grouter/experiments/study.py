"""``grouter reproduce --study NAME``: what the Grouter's gain depends on, one factor at a time.

The study varies one factor at a time around a base cell (``configs/study.toml``: reproduce's sizes
with its own target tokens and baselines), each cell's Grouter run against the baselines of the same
target, at equal tokens and with the same data order (a seed fixes both):

- ``source``: the source trained on more tokens per target token (``source_ratios``), and a bigger
  source (``big_source``, the base's tokens);
- ``tuning``, read on the held-out domain: untuned, tuned on all target data (base), and the
  ``tune_variants`` (on the held-out domain alone, balance-constrained with weight ``tune_keep``,
  selection bias), with the share of top-k sets each keeps from the untuned Grouter; and the cell a
  user meets with their own corpus: the source (still without the held-out domain) captured, and the
  Grouter distilled and folded, on all target data (``captured-on-all``);
- ``heads``: one shared head (base) or a head per source layer, each with the base's source and
  with the strongest;
- ``tokens``: the target tokens times ``token_ratios``, the source and Grouter unchanged; and the
  same for the head-per-layer cell with the strongest source;
- ``experts``: the base's experts, or ``many_experts`` top-``many_top_k`` folded from a
  ``many_source_experts`` source, experts narrower so that a token's active compute is the base's;
- ``scale``: what a head per layer costs at a real source's scale, around the per-layer cell with the
  strongest source: compact targets keeping the top M = 2k, 4k, 8k scores (``TOP_M_TIMES_K``,
  those below the source's experts) and fewer heads than layers (``head_groups`` 1 and 2); each
  cell also records its Grouter's top-k recall and the bytes per token of its targets and store.

The ``seeded`` cells (and the base) run ``seeds`` seeds; the others seed 0. Every stage is a
:class:`grouter.experiments.pipeline.Pipeline` stage, reused or resumed when the study is rerun, and
every target run is a resumable training run. Layout of ``--out``: ``data/``, ``data-source/`` (as
reproduce); ``pipelines/NAME/``: a source and its Grouters and routing stores (cells with the same
source share one); ``runs/TARGET/RUN-sSEED``: every target run, named by what it depends on (a
baseline by its target, tokens and seed only, so the cells of one target share its baselines);
``cells/FACTOR/CELL/``: the cell's results (``cell.json``) and a report of its seed-0 runs;
``study.json``, ``study.md`` and ``plots/``, rewritten after every finished cell. A cell whose
``cell.json`` has the seeds it asks for is finished and not run again (given more seeds, it runs
only the new ones), so copying ``study-config.json`` and ``cells/`` into an empty ``--out``
continues a study on another machine. The results: docs/study.md (cells in docs/study/).

The plan, cell by cell with what it adds and its minutes (:func:`plan_rows`, from the stage times in
the config file's ``[timings]``), is in docs/study.md and in study.md.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_bytes, header, read_json, write_json
from ..errors import GrouterError
from ..formats.dataset import PackedDataset
from ..formats.store import RoutingStore, bytes_per_token
from ..metrics import topk_set_agreement
from ..plots import figure
from ..report import RunRecord, report, speedups
from .pipeline import Pipeline, PipelineConfig, held_out_data, load_config, scaled

STUDY_FORMAT, STUDY_VERSION = "grouter-study", 1
FACTORS = ("source", "tuning", "heads", "tokens", "experts", "scale")  # the order of `all`: the decisive ones first
TITLES = {"source": "Source strength", "tuning": "Tuning (read on the held-out domain)",
          "heads": "Shared head vs a head per layer", "tokens": "Target tokens", "experts": "Experts",
          "scale": "Compact targets and head groups (a head per layer, the strongest source)"}
TOP_M_TIMES_K = (2, 4, 8)  # the scale factor's compact targets: M = 2k, 4k, 8k (those below the source's E)
TUNE_LABELS = {"untuned": "untuned", "": "all target data", "held-out": "the held-out domain alone",
               "keep": "all data, keep-constrained", "bias": "all data, selection bias"}


@dataclass
class StudyConfig:
    """The base cell (reproduce's sizes; its ``baselines`` are every cell's) and how each factor
    departs from it; the values are ``configs/study.toml``'s."""

    base: PipelineConfig
    seeds: int  # of the base cell and of the cells in `seeded`; the others run seed 0
    seeded: tuple[str, ...]
    source_ratios: tuple[float, ...]  # source tokens per target token, beside the base's
    big_source: dict
    token_ratios: tuple[float, ...]  # target tokens per the base's
    tune_variants: tuple[str, ...]  # beside the base's tuning
    tune_keep: float  # the keep variant's weight of KL(untuned || tuned)
    many_experts: int  # the experts cell: the target's experts and top-k, both models' expert width,
    many_top_k: int  # and the source's experts
    many_d_expert: int
    many_source_experts: int


@dataclass(frozen=True)
class Timings:
    """What the plan's minutes are made of (``configs/study.toml``'s ``[timings]``, measured at --scale
    cpu on the idle 2-core machine)."""

    step_seconds: dict[tuple[int, int, int, int], float]  # by (d_model, experts, top-k, d_expert)
    distill_step_seconds: float
    fold_seconds: float
    seconds_per_million_tokens: dict[str, float]
    data_tokens: int
    source_tokens: int

    @classmethod
    def load(cls) -> "Timings":
        t = load_config("study")["timings"]
        steps = {(s["d_model"], s["n_experts"], s["top_k"], s["d_expert"]): s["seconds"] for s in t["step_seconds"]}
        return cls(steps, t["distill_step_seconds"], t["fold_seconds"], t["seconds_per_million_tokens"],
                   t["data_tokens"], t["source_tokens"])


@dataclass
class Cell:
    """One row of a factor's table: the base's sizes with that factor changed."""

    factor: str
    key: str  # directory-safe: cells/FACTOR/KEY
    label: str  # as the tables show it
    cfg: PipelineConfig
    pipeline: str = "base"  # pipelines/NAME: its source and Grouters (cells with the same source share it)
    layers: str | None = None  # None: capture the first layer (a shared head); "all": a head per layer
    top_m: int = 0  # compact targets: keep the top M scores (0: every score)
    head_groups: int | None = None  # fewer heads than layers (None: a head per captured layer)
    capture_all: bool = False  # capture, distil and fold on all target data (the held-out domain too), not the source's
    tune: str = ""  # "": the base's tuning; "untuned"; or one of StudyConfig.tune_variants
    seeds: int = 1
    base: bool = False
    series: str = ""  # the plot joins a factor's cells of one series by a line

    @property
    def id(self) -> str:
        return f"{self.factor}/{self.key}"

    @property
    def target(self) -> str:
        """The target's name under runs/: what a baseline run depends on besides its seed."""
        c = self.cfg
        return f"{c.target_experts}e-top{c.source['top_k']}-dexp{c.target['d_expert']}-{c.target_steps}steps"

    @property
    def variant(self) -> str:
        """What the cell's targets and Grouter are, as their names under the pipeline carry it."""
        return ("-layers-all" if self.layers else "") + (f"-m{self.top_m}" if self.top_m else "") + (
            "-on-data" if self.capture_all else "") + (f"-g{self.head_groups}" if self.head_groups else "")

    @property
    def grouter_run(self) -> str:
        return f"grouter-{self.pipeline}{self.variant}" + (f"-{self.tune}" if self.tune else "")

    def run_names(self) -> list[list[str]]:
        """Per seed, under runs/: the Grouter run, then the baselines' (paired: same seed, same data order)."""
        return [[f"{self.target}/{name}-s{seed}" for name in (self.grouter_run, *self.cfg.baselines)]
                for seed in range(self.seeds)]


SCALES = tuple(load_config("study")["scales"])


def study_config(scale: str, **overrides) -> StudyConfig:
    """``configs/study.toml`` at ``scale``, with reproduce's options applied to its base cell; the source
    keeps its ratio of tokens to the target's when ``target_steps`` changes."""
    config = load_config("study")
    scales = config.pop("scales")
    config.pop("timings")
    if scale not in scales:
        raise GrouterError(f"the study has scales {', '.join(scales)}, not {scale!r}")
    settings = {**config, **scales[scale]}
    reproduce_scale, changes = settings.pop("reproduce_scale"), settings.pop("base")
    base = PipelineConfig.from_dict(scaled(load_config("reproduce"), reproduce_scale, **changes,
                                           baselines=settings.pop("baselines"), fold_ablation=[],
                                           causal_ablation=False, per_layer_heads=False))  # heads: a factor
    given = replace(base, **overrides)
    if "target_steps" in overrides:
        given = replace(given, source_steps=round(base.source_steps * given.target_steps / base.target_steps))
    return StudyConfig(base=given, **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})


def plan(cfg: StudyConfig) -> list[Cell]:
    """Every cell of the study, factor by factor (the order of ``FACTORS``); each factor has the base cell."""
    b = cfg.base
    ratio = b.source_steps / b.target_steps  # source tokens per target token (same batch and length)

    def cell(factor: str, key: str, label: str, c: PipelineConfig = b, **kw) -> Cell:
        return Cell(factor, key, label, c, seeds=cfg.seeds if f"{factor}/{key}" in cfg.seeded else 1, **kw)

    def base(factor: str, key: str, label: str) -> Cell:
        return Cell(factor, key, f"{label} (base)", b, seeds=cfg.seeds, base=True)

    bigger = cfg.big_source
    source = [base("source", f"{ratio:g}x", f"{ratio:g}×")]
    source += [cell("source", f"{r:g}x", f"{r:g}×", replace(b, source_steps=round(r * b.target_steps)),
                    pipeline=f"source-{r:g}x") for r in cfg.source_ratios]
    source.append(cell("source", "bigger", f"{ratio:g}×, d_model {bigger['d_model']}", replace(b, source=bigger),
                       pipeline="source-bigger"))
    variants = [cell("tuning", v, TUNE_LABELS[v], tune=v) for v in cfg.tune_variants]
    tuning = [v for v in variants if v.tune == "untuned"] + [base("tuning", "all", TUNE_LABELS[""])] + [
        v for v in variants if v.tune != "untuned"]
    tuning.append(cell("tuning", "captured-on-all", f"all data; captured, distilled and folded on all data, "
                       f"{b.held_out_domain} included (the source never saw it)", capture_all=True))
    r = max(cfg.source_ratios)  # heads cross the strongest source: shared / per-layer × 1× / r× source
    strong = dict(c=replace(b, source_steps=round(r * b.target_steps)), pipeline=f"source-{r:g}x")
    heads = [base("heads", "shared", "one shared head"), cell("heads", "per-layer", "a head per layer", layers="all"),
             cell("heads", f"shared-{r:g}x", f"one shared head, {r:g}× source", **strong),
             cell("heads", f"per-layer-{r:g}x", f"a head per layer, {r:g}× source", layers="all", **strong)]
    tokens = sorted([base("tokens", "1x", "1×")] + [cell("tokens", f"{t:g}x", f"{t:g}×",
                                                        replace(b, target_steps=round(t * b.target_steps)))
                                                   for t in cfg.token_ratios], key=lambda c: c.cfg.target_steps)
    tokens += [cell("tokens", f"{t:g}x-per-layer-{r:g}x", f"{t:g}×, a head per layer, {r:g}× source",  # the best
                    replace(strong["c"], target_steps=round(t * b.target_steps)), pipeline=strong["pipeline"],
                    layers="all", series="per-layer") for t in sorted((1.0, *cfg.token_ratios))]
    experts = [base("experts", f"{b.target_experts}e", f"{b.target_experts} experts, top-{b.source['top_k']}"),
               many_experts(cfg, cell)]
    k, E = b.source["top_k"], b.source["n_experts"]
    scale = [cell("scale", "full", f"every score, a head per layer, {r:g}× source", layers="all", **strong)]
    scale += [cell("scale", f"m{m}k", f"top {m * k} scores (M = {m}k)", layers="all", top_m=m * k, **strong)
              for m in TOP_M_TIMES_K if m * k < E]
    scale += [cell("scale", f"g{g}", f"{g} head{'s' if g > 1 else ''} for the {b.source['n_layers']} layers",
                   layers="all", head_groups=g, **strong) for g in (1, 2) if g < b.source["n_layers"]]
    return source + tuning + heads + tokens + experts + scale


def many_experts(cfg: StudyConfig, cell) -> Cell:
    """The experts cell: more, narrower experts in source and target, a token's active compute unchanged
    when ``many_top_k × many_d_expert`` is the base's ``top_k × d_expert``."""
    b, E, k = cfg.base, cfg.many_experts, cfg.many_top_k
    c = replace(b, source={**b.source, "n_experts": cfg.many_source_experts, "top_k": k, "d_expert": cfg.many_d_expert},
                target={**b.target, "d_expert": cfg.many_d_expert}, target_experts=E)
    return cell("experts", f"{E}e", f"{E} experts, top-{k} (source {cfg.many_source_experts})", c,
                pipeline=f"source-{cfg.many_source_experts}e")


def tune_options(cfg: StudyConfig, variant: str) -> dict:
    """The :class:`grouter.tune.Options` of a tuning variant ("": the base's, the defaults)."""
    return {"": {}, "held-out": {"domain": cfg.base.held_out_domain}, "keep": {"keep": cfg.tune_keep},
            "bias": {"method": "bias"}}[variant]


# -- running ----------------------------------------------------------------------------------------
def run_study(out: str | Path, name: str, cfg: StudyConfig) -> dict:
    """Run the cells ``name`` selects (:func:`selected`), each stage once: rerun to resume."""
    cells = selected(name, plan(cfg))
    t0, out = time.perf_counter(), Path(out)
    root = Pipeline(out, cfg.base, "study")
    data, source_data = held_out_data(root, cfg.base)
    check_config(out, cfg)
    summary = write_study(out, cfg)  # the plan, before the first run: a skeleton of the results
    for cell in cells:
        if finished(out, cell):
            root.say(f"{cell.id}: finished, reusing {out / 'cells' / cell.factor / cell.key}")
            continue
        run_cell(out, cfg, cell, data, source_data)
        summary = write_study(out, cfg)
    print(f"study: {out / 'study.md'} (cells in {out / 'cells'}, plots in {out / 'plots'})")
    return {"study": name, "out": str(out), "seconds_this_invocation": time.perf_counter() - t0,
            "cells": {c["id"]: headline(c) for c in summary["cells"] if c["status"] == "done"}}


def selected(name: str, cells: list[Cell]) -> list[Cell]:
    """The cells ``name`` asks for, in the plan's order: ``all``, a factor, a cell (``FACTOR/KEY``), or
    several of these separated by commas (to split a study between machines, see docs/study.md)."""
    wanted = set(name.split(","))
    unknown = sorted(wanted - {"all", *FACTORS, *(c.id for c in cells)})
    if unknown:
        raise GrouterError(f"unknown study {unknown[0]!r}; choose all, a factor ({', '.join(FACTORS)}) or a cell "
                           f"({', '.join(c.id for c in cells)}), or several separated by commas")
    return [c for c in cells if wanted & {"all", c.factor, c.id}]


SEED_FIELDS = ("seeds", "seeded")  # how many runs a cell has, not what each run is: these may change


def check_config(out: Path, cfg: StudyConfig) -> None:
    """A study directory holds one configuration: cells of two would not compare. Only the seeds may
    change (a cell given more seeds keeps the runs it has), and the directory records the new ones."""
    path, mine = out / "study-config.json", json.loads(json.dumps(asdict(cfg)))
    if path.exists():
        theirs = read_json(path, "study configuration")["config"]
        if {k: v for k, v in theirs.items() if k not in SEED_FIELDS} != {
                k: v for k, v in mine.items() if k not in SEED_FIELDS}:
            raise GrouterError(f"{out} holds a study with another configuration (scale, steps, data or held-out "
                               "domain); rerun it with its own options, or choose another --out")
        if theirs == mine:
            return
    write_json(path, {**header(STUDY_FORMAT, STUDY_VERSION), "config": mine})


def finished(out: Path, cell: Cell) -> bool:
    """Whether the cell's cell.json (made here, or copied in) holds at least the seeds it asks for."""
    path = out / "cells" / cell.factor / cell.key / "cell.json"
    return path.exists() and read_json(path, "study cell")["seeds"] >= cell.seeds


def run_cell(out: Path, cfg: StudyConfig, cell: Cell, data: PackedDataset, source_data: PackedDataset) -> None:
    """The cell's Grouter, its target runs (reused when another cell made them), its results in cell.json."""
    pipe = Pipeline(out / "pipelines" / cell.pipeline, cell.cfg, f"study {cell.id}")
    targets = pipe.source_targets(source_data, bool(cell.layers), cell.top_m, data if cell.capture_all else None)
    distilled, distill_summary = pipe.distilled(targets, head_groups=cell.head_groups)
    folded = pipe.folded(distilled, data if cell.capture_all else source_data)
    grouter = folded if cell.tune == "untuned" else pipe.tuned(folded, data, cell.tune, **tune_options(cfg, cell.tune))
    store = pipe.routing(grouter, data)
    seconds = {f"{pipe.out.relative_to(out)}/{k}": v for k, v in pipe.seconds.items()}
    for seed, names in enumerate(cell.run_names()):
        stages = Pipeline(out, replace(cell.cfg, seed=seed), f"study {cell.id}, seed {seed}")
        stages.train_target(data, names[0], store=store)
        for router, name in zip(cell.cfg.baselines, names[1:]):
            stages.train_target(data, name, router=router)
        seconds.update(stages.seconds)
    result = cell_result(cell, [[out / "runs" / n for n in names] for names in cell.run_names()])
    result["distilled"] = {k: distill_summary[k] for k in ("val_kl", "val_topk_recall")}
    result["bytes_per_token"] = {"targets": targets.bytes_per_token, "routing": routing_bytes(store)}
    if cell.factor == "tuning":
        result["routing_kept"] = routing_kept(pipe.routing(folded, data), store, data)
        result["tune_report"] = tune_summary(grouter)
    directory = out / "cells" / cell.factor / cell.key
    report(directory / "report", overwrite=True, runs=[out / "runs" / n for n in cell.run_names()[0]])
    write_json(directory / "cell.json", {**header(STUDY_FORMAT, STUDY_VERSION), **describe(cell), **result,
                                         "stage_seconds": seconds})


def describe(cell: Cell) -> dict:
    return {"id": cell.id, "factor": cell.factor, "key": cell.key, "label": cell.label, "base": cell.base,
            "seeds": cell.seeds, "pipeline": cell.pipeline, "series": cell.series, "target": cell.target,
            "runs": cell.run_names()}


# -- results ------------------------------------------------------------------------------------------
def cell_result(cell: Cell, runs: list[list[Path]]) -> dict:
    """Per validation set (``all``, then each domain) and seed: the best of that seed's baselines, the
    Grouter's tokens-to-loss speedup over it and its final-loss gap; the Grouter runs' own figures."""
    sets: dict[str, dict[str, list]] = {}
    grouter: dict[str, list] = {"final_val_loss": [], "max_vio_global": []}
    for seed_runs in runs:
        records = [RunRecord.load(r) for r in seed_runs]
        for d in ["all", *sorted(records[0].summary["val_loss_by_domain"])]:
            s = speedups(records, None if d == "all" else d)
            mine = s["runs"][records[0].name]
            entry = sets.setdefault(d, {"best_baseline": [], "speedup": [], "gap": []})
            entry["best_baseline"].append(s["best_baseline"].rsplit("-s", 1)[0])
            entry["speedup"].append(mine["speedup"])  # None: never reached the baseline's final loss
            entry["gap"].append(mine["final_val_loss_gap"])
        for key, values in grouter.items():
            values.append(records[0].summary[key])
    return {"by_domain": sets, "grouter": grouter}


def routing_bytes(store: Path) -> int:
    """A routing store's bytes per token: ids and weights of every head."""
    s = RoutingStore.open(store)
    return bytes_per_token(s.k, s.n_experts, len(s.heads) if s.heads else 1)


def routing_kept(untuned: Path, tuned: Path, data: PackedDataset) -> dict[str, float]:
    """Share of validation tokens whose top-k set tuning kept from the untuned Grouter: on all
    validation sequences and per domain (the stored routing the target runs trained with)."""
    before, after = RoutingStore.open(untuned, data=data), RoutingStore.open(tuned, data=data)
    val = data.split("val")
    domain_ids = val.domain_ids()
    sets = {"all": np.arange(len(val)), **{d: np.flatnonzero(domain_ids == i) for i, d in enumerate(val.domains)}}
    return {name: topk_set_agreement(before.routing("val", idx).ids, after.routing("val", idx).ids)
            for name, idx in sets.items() if len(idx)}


def tune_summary(grouter: Path) -> dict | None:
    """What tuning reported on its own held-out sequences (None: an untuned Grouter)."""
    path = grouter / "tune_report.json"
    if not path.exists():
        return None
    r = read_json(path, "tune report")
    return {"method": r["method"], "domain": r["domain"], "keep": r.get("keep", 0.0),
            "max_vio_global_before": r["before"]["max_vio_global"], "max_vio_global_after": r["after"]["max_vio_global"],
            "topk_set_agreement_with_untuned": r["topk_set_agreement_with_untuned"]}


def spread(values: list) -> dict:
    """Median, min and max over seeds; a speedup of None (not reached) counts as the lowest."""
    ordered = sorted(values, key=lambda v: -np.inf if v is None else v)
    return {"n": len(values), "min": ordered[0], "median": ordered[(len(values) - 1) // 2], "max": ordered[-1]}


def headline(cell: dict) -> dict:
    """Median speedup and gap of a finished cell, per validation set."""
    return {d: {"speedup": spread(v["speedup"])["median"], "gap": spread(v["gap"])["median"]}
            for d, v in cell["by_domain"].items()}


# -- study.json, study.md, plots ------------------------------------------------------------------------
def write_study(out: Path, cfg: StudyConfig) -> dict:
    """study.json, study.md and plots/ from every cell finished so far (any invocation's): partial
    results are usable as they come, and pending cells show what is left to run."""
    cells = []
    for cell in plan(cfg):
        path = out / "cells" / cell.factor / cell.key / "cell.json"
        if path.exists():
            done = {k: v for k, v in read_json(path, "study cell").items() if k not in ("format", "version")}
            cells.append({**done, "status": "done"})
        else:
            cells.append({**describe(cell), "status": "pending"})
    summary = {**header(STUDY_FORMAT, STUDY_VERSION), "config": asdict(cfg), "held_out": cfg.base.held_out_domain,
               "baselines": list(cfg.base.baselines), "plan": plan_rows(cfg), "cells": cells,
               "stage_seconds": {k: v for c in cells for k, v in c.get("stage_seconds", {}).items()}}
    write_json(out / "study.json", summary)
    plots = [plot_factor(summary, factor, out / "plots") for factor in FACTORS]
    atomic_write_bytes(out / "study.md", study_markdown(summary, [p for p in plots if p]).encode())
    return summary


def _speedup(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.2f}×"


def _with_spread(values: list, fmt) -> str:
    """One seed: the value; several: the median and (min…max)."""
    s = spread(values)
    return fmt(s["median"]) if s["n"] == 1 else f"{fmt(s['median'])} ({fmt(s['min'])}…{fmt(s['max'])})"


def _gap(v: float) -> str:
    return f"{v:+.3f}".replace("-", "−")


def _best(names: list[str]) -> str:
    return names[0] if len(set(names)) == 1 else ", ".join(names)


def _seen_table(cells: list[dict], held: str) -> list[str]:
    domains = ["all"] + sorted({d for c in cells if c["status"] == "done" for d in c["by_domain"]} - {"all", held})
    lines = ["| cell | seeds | " + " | ".join(domains) + " | best baseline (all) | Grouter MaxVioGlobal |",
             "|---|---|" + "---|" * (len(domains) + 2)]
    for c in cells:
        if c["status"] != "done":
            lines.append(f"| {c['label']} | {c['seeds']} | pending |" + " |" * (len(domains) + 1))
            continue
        entries = [f"{_with_spread(c['by_domain'][d]['speedup'], _speedup)}; "
                   f"{_with_spread(c['by_domain'][d]['gap'], _gap)}" for d in domains]
        lines.append(f"| {c['label']} | {c['seeds']} | " + " | ".join(entries) + f" | "
                     f"{_best(c['by_domain']['all']['best_baseline'])} | "
                     f"{_with_spread(c['grouter']['max_vio_global'], lambda v: f'{v:.3f}')} |")
    return lines


def _held_out_table(cells: list[dict], held: str, tuning: bool) -> list[str]:
    more = f" top-k sets kept ({held}) | top-k sets kept (all) |" if tuning else ""
    lines = [f"| cell | seeds | speedup | final-loss gap | best baseline |{more}",
             "|---|---|---|---|---|" + ("---|---|" if tuning else "")]
    for c in cells:
        if c["status"] != "done":
            lines.append(f"| {c['label']} | {c['seeds']} | pending | | |" + (" | |" if tuning else ""))
            continue
        h = c["by_domain"][held]
        row = (f"| {c['label']} | {c['seeds']} | {_with_spread(h['speedup'], _speedup)} | "
               f"{_with_spread(h['gap'], _gap)} | {_best(h['best_baseline'])} |")
        if tuning:
            kept = c.get("routing_kept", {})
            row += "".join(f" {kept[k]:.1%} |" if k in kept else " – |" for k in (held, "all"))
        lines.append(row)
    return lines


def _cost_table(cells: list[dict]) -> list[str]:
    """The distilled Grouter's top-k recall and KL (validation, mean over layers) and the bytes per token
    of the cell's targets and routing store."""
    lines = ["| cell | top-k recall | KL | targets bytes/token | store bytes/token |", "|---|---|---|---|---|"]
    for c in cells:
        if c["status"] != "done" or "distilled" not in c:
            lines.append(f"| {c['label']} | pending | | | |")
            continue
        d, b = c["distilled"], c["bytes_per_token"]
        lines.append(f"| {c['label']} | {d['val_topk_recall']:.3f} | {d['val_kl']:.3f} | {b['targets']} | {b['routing']} |")
    return lines


def _shape(model: dict) -> str:
    """``d 128, 4 layers, 32 experts top-4, d_expert 64`` from a model's sizes."""
    parts = [f"d {model['d_model']}", f"{model['n_layers']} layers"]
    if "n_experts" in model:
        parts.append(f"{model['n_experts']} experts top-{model['top_k']}")
    return ", ".join(parts + [f"{k} {model[k]}" for k in ("d_expert", "d_ff") if k in model])


def study_markdown(summary: dict, plots: list[str]) -> str:
    held, cfg = summary["held_out"], summary["config"]["base"]
    text = ["# grouter reproduce --study", "",
            f"One factor at a time around the base cell; every cell's Grouter run against the best of its "
            f"baselines ({', '.join(summary['baselines'])}) of the same seed, at equal tokens and data order. "
            f"**{held}** is held out: the source and the Grouter's network never see it. Entries: tokens-to-loss "
            "speedup; final validation loss gap (negative: the Grouter ends lower). With several seeds: the "
            "median (min…max); the best baseline is chosen per seed and per validation set.", "",
            f"Base cell: source {_shape(cfg['source'])}, {cfg['source_steps']} steps; Grouter {_shape(cfg['grouter'])}; "
            f"target {_shape(cfg['target'])}, {cfg['target_experts']} experts top-{cfg['source']['top_k']}, "
            f"{cfg['target_steps']} steps × {cfg['batch_size']} × {cfg['seq_len']} tokens.", "",
            "## Plan", "", *plan_markdown(summary["plan"], summary["cells"]), ""]
    for factor in FACTORS:
        cells = [c for c in summary["cells"] if c["factor"] == factor]
        text += [f"## {TITLES[factor]} (`--study {factor}`)", "", "All validation data and the domains the source saw:",
                 "", *_seen_table(cells, held), "", f"Held-out domain ({held}):", "",
                 *_held_out_table(cells, held, factor == "tuning"), ""]
        text += ["What the Grouter and its artifacts are:", "", *_cost_table(cells), ""] if factor == "scale" else []
        text += [f"![{factor}](plots/{factor}.png)", ""] if f"{factor}.png" in plots else []
    return "\n".join(text)


def _plot_spread(ax, x: np.ndarray, spreads: list[dict], color: str, label: str) -> None:
    """Medians joined by a line, bars from min to max; a speedup never reached (None, below 1×) is a
    hollow triangle at 1 (its bar ends there)."""
    def value(v):  # a speedup's None (below 1) is drawn at 1
        return 1.0 if v is None else v

    mid = np.array([value(v["median"]) for v in spreads])
    low, high = np.array([value(v["min"]) for v in spreads]), np.array([value(v["max"]) for v in spreads])
    ax.errorbar(x, mid, yerr=[mid - np.minimum(low, mid), high - mid], color=color, marker="o", capsize=3, label=label)
    missed = np.array([v["median"] is None for v in spreads])
    if missed.any():
        ax.plot(x[missed], mid[missed], "v", color=color, markerfacecolor="white", markersize=9,
                label=f"{label}: not reached (< 1×)")


def plot_factor(summary: dict, factor: str, out: Path) -> str | None:
    """``plots/FACTOR.png``: speedup (top) and final-loss gap (bottom) per cell, the domains the source
    saw and all validation data (left), the held-out domain (right); bars span the seeds."""
    cells = [c for c in summary["cells"] if c["factor"] == factor and c["status"] == "done"]
    if not cells:
        return None
    held = summary["held_out"]
    fig, axes = figure((11, 7), 2, 2, sharex=True, squeeze=False)
    x = np.arange(len(cells))
    series = [list(g) for _, g in itertools.groupby(range(len(cells)), key=lambda n: cells[n].get("series", ""))]
    domains = list(cells[0]["by_domain"])
    for col, shown in enumerate(([d for d in domains if d != held], [held])):
        for row, (key, ref, label) in enumerate((("speedup", 1.0, "tokens-to-loss speedup"),
                                                 ("gap", 0.0, "final-loss gap"))):
            ax = axes[row][col]
            for i, d in enumerate(shown):
                for j, part in enumerate(series):  # one line per series; the legend names the domain once
                    _plot_spread(ax, x[part] + 0.06 * i, [spread(cells[n]["by_domain"][d][key]) for n in part],
                                 f"C{i}", d if j == 0 else f"_{d}")
            ax.axhline(ref, color="black", lw=0.8, ls="--")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_title(f"held-out domain ({held})" if col else "all validation data and seen domains")
        axes[1][col].set_xticks(x, [c["label"] for c in cells], rotation=20, fontsize=8)
    fig.suptitle(f"{TITLES[factor]}: the Grouter over the best baseline")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{factor}.{os.getpid()}.png"  # then renamed: another invocation may be writing it too
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out / f"{factor}.png")
    return f"{factor}.png"


# -- the plan: what each cell adds, and how long it takes --------------------------------------------
def step_seconds(timings: Timings, model: dict, n_experts: int, top_k: int, tokens_per_step: int) -> float:
    """A training step's measured time for this shape, or the first shape's scaled by the expert FLOPs."""
    measured = timings.step_seconds.get((model["d_model"], n_experts, top_k, model["d_expert"]))
    if measured is None:
        (d, _, k, f), seconds = next(iter(timings.step_seconds.items()))
        scale = (model["d_model"] * (model["d_expert"] * top_k + 2 * model["d_model"])) / (d * (f * k + 2 * d))
        measured = seconds * scale * model["n_layers"] / 4
    return measured * tokens_per_step / (16 * 128)


def cell_work(cell: Cell, t: Timings) -> list[tuple[str, str, float]]:
    """(name under --out, what, seconds) of everything the cell needs, shared or not."""
    c, p = cell.cfg, f"pipelines/{cell.pipeline}"
    per_step = c.batch_size * c.seq_len
    layers = cell.variant
    targets = "-layers-all" if cell.layers else ""
    targets += f"-m{cell.top_m}" if cell.top_m else ""
    targets += "-on-data" if cell.capture_all else ""
    tuned = {"untuned": "-folded", "": ""}.get(cell.tune, f"-tune-{cell.tune}")
    work = [(f"{p}/source", f"source, {c.source_steps:,} steps",
             c.source_steps * step_seconds(t, c.source, c.source["n_experts"], c.source["top_k"], per_step)),
            (f"{p}/targets{targets}", "capture", t.seconds_per_million_tokens["capture"]
             * (t.data_tokens if cell.capture_all else t.source_tokens) / 1e6),
            (f"{p}/grouter-distilled{layers}", "distill", c.distill_steps * t.distill_step_seconds),
            (f"{p}/grouter-folded{layers}", "fold", t.fold_seconds)]
    if cell.tune != "untuned":
        work.append((f"{p}/grouter{layers}{tuned}", "tune", t.seconds_per_million_tokens["tune"] * c.tune_tokens / 1e6))
    stores = [f"{p}/routing{layers}{tuned}"] + ([f"{p}/routing-folded{layers}"] if cell.factor == "tuning" else [])
    work += [(name, "dispatch", t.seconds_per_million_tokens["dispatch"] * t.data_tokens / 1e6) for name in stores]
    run = c.target_steps * step_seconds(t, c.target, c.target_experts, c.source["top_k"], per_step)
    return work + [(f"runs/{name}", "target run", run) for names in cell.run_names() for name in names]


def plan_rows(cfg: StudyConfig) -> list[dict]:
    """Per cell, in the order ``all`` runs them: what it adds to the cells before it, and the minutes."""
    timings, done = Timings.load(), set()
    rows = []
    for cell in plan(cfg):
        work = cell_work(cell, timings)
        new = [(what, seconds) for name, what, seconds in work if name not in done]
        done |= {name for name, _, _ in work}
        counts: dict[str, int] = {}
        for what, _ in new:
            counts[what] = counts.get(what, 0) + 1
        rows.append({"id": cell.id, "label": cell.label, "seeds": cell.seeds,
                     "adds": ", ".join(w if n == 1 else f"{n} {w}{'es' if w.endswith('ch') else 's'}"
                                       for w, n in counts.items()) or "nothing (shared)",
                     "minutes": sum(s for _, s in new) / 60})
    return rows


def plan_markdown(rows: list[dict], cells: list[dict] | None = None) -> list[str]:
    status = {c["id"]: c["status"] for c in cells or []}
    seeds = {r["id"]: r["seeds"] for r in rows}
    status |= {c["id"]: f"{c['seeds']} of {seeds[c['id']]} seeds" for c in cells or []
               if c["status"] == "done" and c["seeds"] < seeds.get(c["id"], 0)}  # more seeds asked since
    lines = ["| cell | seeds | adds | minutes |" + (" status |" if cells else ""),
             "|---|---|---|---|" + ("---|" if cells else "")]
    for r in rows:
        lines.append(f"| {r['id']}: {r['label']} | {r['seeds']} | {r['adds']} | {r['minutes']:.0f} |"
                     + (f" {status.get(r['id'], 'pending')} |" if cells else ""))
    total = sum(r["minutes"] for r in rows)
    return lines + ["", f"Total: about {total:.0f} minutes ({total / 60:.1f} h) on the 2-core machine at --scale cpu."]
