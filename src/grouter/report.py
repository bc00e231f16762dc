"""Plots and tables for people: what each stage did, and how training runs compare."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import header, write_json
from .errors import GrouterError
from .formats.run import checked_files, read_metrics, read_run
from .metrics import grad_norm_cv, topk_set_agreement
from .options import path_input
from .plots import figure
from .runner import Output, Stage

REPORT_FORMAT, REPORT_VERSION = "grouter-report", 1


# -- comparing training runs (grouter report) --------------------------------------------------
@dataclass
class RunRecord:
    """What the report needs of one training run directory."""

    name: str
    path: Path
    router: str  # baseline name, or "grouter" for external routing
    summary: dict
    train: list[dict]
    evals: list[dict]

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        path = Path(path)
        run = read_run(path)
        ident = run["identity"]
        if "model" not in ident or "train" not in ident:
            made = run.get("command") or ("distill" if "distill" in ident else "ep")
            raise GrouterError(f"{path} is a `grouter {made}` run; report compares the training runs of `grouter train` "
                               "(and `grouter source train`)")
        if run.get("status") != "complete":
            raise GrouterError(f"{path} is not a finished run (status {run.get('status')!r}); finish it first")
        checked_files(path, run)
        records = read_metrics(path / "metrics.jsonl")
        router = ident["model"]["router"]
        if router == "external":
            routing = ident.get("routing") or {}
            router = "grouter" if routing.get("causal", True) else "grouter (bidirectional, leaks)"
        return cls(path.name, path, router, run["summary"], [r for r in records if r["kind"] == "train"],
                   [r for r in records if r["kind"] == "eval"])

    def probe_consistency(self) -> list[tuple[int, float]]:
        """Top-k set agreement of every layer's routing between successive evaluations."""
        probes = sorted((self.path / "probes").glob("step_*.npy"))
        out = []
        for a, b in zip(probes, probes[1:]):
            out.append((int(b.stem.split("_")[1]), topk_set_agreement(np.load(a), np.load(b))))
        return out


def val_curve(evals: list[dict], domain: str | None = None) -> list[tuple[float, float]]:
    """(tokens, validation loss) points: on all validation data, or on one domain of it."""
    return [(float(e["tokens"]), e["val_loss"] if domain is None else e["val_loss_by_domain"][domain])
            for e in evals if domain is None or domain in e.get("val_loss_by_domain", {})]


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which a validation curve first reaches ``target`` (linear interpolation)."""
    prev_tokens, prev_loss = 0.0, None
    for tokens, loss in curve:
        if loss <= target:
            if prev_loss is None or prev_loss == loss:
                return tokens
            return prev_tokens + (prev_loss - target) / (prev_loss - loss) * (tokens - prev_tokens)
        prev_tokens, prev_loss = tokens, loss
    return None


def speedups(runs: list[RunRecord], domain: str | None = None) -> dict:
    """Tokens-to-loss speedup of each Grouter run over the best baseline (lowest final val loss),
    measured on all validation data or on one domain's (the best baseline is chosen per domain)."""
    curves = {r.name: val_curve(r.evals, domain) for r in runs}
    baselines = [r for r in runs if not r.router.startswith("grouter") and curves[r.name]]
    if not baselines:
        return {}
    best = min(baselines, key=lambda r: curves[r.name][-1][1])
    target = curves[best.name][-1][1]
    needed = tokens_to_reach(curves[best.name], target)
    out = {"best_baseline": best.name, "target_val_loss": target, "baseline_tokens": needed, "runs": {}}
    for r in runs:
        if r.router.startswith("grouter") and curves[r.name]:
            reached = tokens_to_reach(curves[r.name], target)
            out["runs"][r.name] = {
                "tokens_to_target": reached,
                "speedup": needed / reached if reached else None,  # None: never reached it
                "final_val_loss_gap": curves[r.name][-1][1] - target,
            }
    return out


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = True) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def _line_style(i: int) -> dict:
    """Ten colours, then the same colours dashed: every run of a reproduction stays distinguishable."""
    return {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}


def _plot_val_loss(runs: list[RunRecord], style: dict, out: Path) -> list[str]:
    fig, ax = figure((7, 4.5))
    for r in runs:
        ax.plot([e["tokens"] for e in r.evals], [e["val_loss"] for e in r.evals], marker="o", ms=3, label=r.name,
                **style[r.name])
    return [_save(fig, ax, out / "val_loss.png", "training tokens", "validation loss", "validation loss vs tokens")]


def _plot_val_loss_by_domain(runs: list[RunRecord], style: dict, out: Path) -> list[str]:
    domains = sorted({d for r in runs for e in r.evals for d in e.get("val_loss_by_domain", {})})
    if len(domains) < 2:
        return []
    fig, axes = figure((4.5 * len(domains), 4.2), 1, len(domains), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for r in runs:
            curve = val_curve(r.evals, domain)
            ax.plot([t for t, _ in curve], [v for _, v in curve], marker="o", ms=2, label=r.name, **style[r.name])
        ax.set_title(f"validation: {domain}")
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss_by_domain.png", dpi=110)
    return ["val_loss_by_domain.png"]


def _plot_balance_and_stability(runs: list[RunRecord], style: dict, out: Path) -> list[str]:
    fig, ax = figure((6, 4.5))
    for r in runs:
        ax.scatter(r.summary["max_vio_global"], r.summary["final_val_loss"], s=40, color=style[r.name]["color"])
        ax.annotate(r.name, (r.summary["max_vio_global"], r.summary["final_val_loss"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    written = [_save(fig, ax, out / "maxvio_vs_loss.png", "MaxVioGlobal (lower = more balanced)",
                     "final validation loss", "load balance vs quality", legend=False)]
    fig, ax = figure((7, 4.5))
    for r in runs:
        g = [t["grad_norm"] for t in r.train]
        window = min(50, max(2, len(g) // 4))
        ax.plot(np.arange(window, len(g) + 1), grad_norm_cv(g, window), label=r.name, **style[r.name])
    written.append(_save(fig, ax, out / "grad_norm_cv.png", "step", "grad-norm CV (sliding window)",
                         "gradient-norm stability"))
    return written


def _plot_consistency(runs: list[RunRecord], style: dict, out: Path) -> list[str]:
    consistency = {r.name: r.probe_consistency() for r in runs}
    if not any(consistency.values()):
        return []
    fig, ax = figure((7, 4.5))
    for name, points in consistency.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name, **style[name])
    ax.set_ylim(0, 1.05)
    return [_save(fig, ax, out / "routing_consistency.png", "step", "top-k set agreement with previous evaluation",
                  "routing consistency between successive checkpoints")]


def _plot_runs(runs: list[RunRecord], out: Path) -> list[str]:
    style = {r.name: _line_style(i) for i, r in enumerate(runs)}
    return [name for plot in (_plot_val_loss, _plot_val_loss_by_domain, _plot_balance_and_stability, _plot_consistency)
            for name in plot(runs, style, out)]


def _fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(runs: list[RunRecord], speed: dict) -> str:
    domains = sorted({d for r in runs for d in r.summary.get("val_loss_by_domain", {})})
    head = ["run", "router", "tokens", "val loss", *[f"val {d}" for d in domains], "MaxVioGlobal",
            "mean batch MaxVio", "grad-norm CV", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        s = r.summary
        cells = [r.name, r.router, f"{s['tokens']:,}", _fmt(s["final_val_loss"]),
                 *[_fmt(s["val_loss_by_domain"].get(d)) for d in domains], _fmt(s["max_vio_global"]),
                 _fmt(s["max_vio_batch_mean"]), _fmt(s.get("grad_norm_cv50_mean")), _fmt(s.get("tokens_per_second"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if speed.get("runs"):
        text += (f"\nTokens-to-loss speedup over the best baseline ({speed['best_baseline']}, final val loss "
                 f"{speed['target_val_loss']:.3f}, reached at {speed['baseline_tokens']:,.0f} tokens):\n\n"
                 "| run | tokens to reach it | speedup | final loss gap |\n|---|---|---|---|\n")
        for name, v in speed["runs"].items():
            reached = "not reached" if v["tokens_to_target"] is None else f"{v['tokens_to_target']:,.0f}"
            speedup = "< 1 (not reached)" if v["speedup"] is None else f"{v['speedup']:.2f}×"
            text += f"| {name} | {reached} | {speedup} | {v['final_val_loss_gap']:+.3f} |\n"
    return text


def speedup_by_domain_table(by_domain: dict[str, dict]) -> str:
    """One row per Grouter run, one column per validation set: speedup (final loss gap)."""
    sets = [d for d, s in by_domain.items() if s.get("runs")]
    if not sets:
        return ""
    names = list(next(by_domain[d] for d in sets)["runs"])
    best = [f"{by_domain[d]['best_baseline']} ({by_domain[d]['target_val_loss']:.3f})" for d in sets]
    lines = ["| run | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets),
             "| best baseline | " + " | ".join(best) + " |"]
    for name in names:
        cells = []
        for d in sets:
            v = by_domain[d]["runs"][name]
            cells.append(("not reached" if v["speedup"] is None else f"{v['speedup']:.2f}×")
                         + f" ({v['final_val_loss_gap']:+.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ("\nTokens-to-loss speedup over the best baseline of each validation set (final loss gap in "
            "brackets; `all` is every validation sequence):\n\n" + "\n".join(lines) + "\n")


@dataclass
class Inputs:
    runs: list[Path] = path_input("finished training runs (grouter train, source train)", many=True, positional=True,
                                  metavar="RUN_DIR")


@dataclass
class Options:
    """grouter report has no options: what it compares is its inputs."""


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    """Markdown + JSON tables and PNG plots comparing finished runs."""
    if not inputs.runs:
        raise GrouterError("no run directories given; pass the --out directories of `grouter train` runs")
    runs = [RunRecord.load(d) for d in inputs.runs]
    speed = speedups(runs)
    domains = sorted({d for r in runs for d in r.summary.get("val_loss_by_domain", {})})
    by_domain = {"all": speed, **{d: speedups(runs, d) for d in domains}}
    table = markdown_table(runs, speed) + speedup_by_domain_table(by_domain)
    with out.atomic() as tmp:
        plots = _plot_runs(runs, tmp)
        (tmp / "report.md").write_text("# grouter report\n\n" + table + "\n" +
                                       "".join(f"![{p}]({p})\n" for p in plots))
        write_json(tmp / "report.json", {**header(REPORT_FORMAT, REPORT_VERSION),
                                         "runs": {r.name: {"router": r.router, "path": str(r.path), **r.summary}
                                                  for r in runs},
                                         "speedup": speed, "speedup_by_domain": by_domain, "plots": plots})
    return {"report": str(out.path), "table": table, "speedup": speed, "speedup_by_domain": by_domain}


report = Stage("report", run, Inputs, Options)
