"""The whole pipeline as one experiment: its configuration, and the runner that makes its stages.

An experiment (``grouter demo``, ``grouter reproduce``, the study) is a :class:`PipelineConfig`
read from a config file in ``configs/`` (:func:`load_config`), and a script of stages run by
:class:`Pipeline`: each stage goes through :func:`grouter.runner.execute` into its own directory
under the experiment's ``--out``, so a stage whose directory already holds its result is reused,
the stages that resume (training, capture, dispatch) do so, and an interrupted experiment picks up
where it stopped when rerun.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..capture import capture
from ..data import data_prepare, data_subset
from ..dispatch import dispatch
from ..distill import distill, distill_schedule
from ..errors import GrouterError
from ..formats.dataset import PackedDataset
from ..formats.store import RoutingStore
from ..formats.targets import Targets
from ..fold import fold
from ..loop import TrainConfig
from ..model import ModelOptions
from ..runner import Stage
from ..train import source_train, train
from ..tune import tune

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIGS = Path(__file__).with_name("configs")


@dataclass
class PipelineConfig:
    """Every size and schedule of one run of the pipeline; the values live in the config files."""

    vocab_size: int
    seq_len: int
    source: dict  # the source MoE's sizes (grouter.model.ModelOptions fields)
    source_steps: int
    grouter: dict  # the Grouter's trunk (grouter.formats.grouter.Architecture fields)
    distill_steps: int
    target_experts: int
    tune_tokens: int
    target: dict  # the target MoE's sizes, but its experts and k (the folded Grouter's)
    target_steps: int
    batch_size: int
    eval_every: int  # target runs: validation points for the tokens-to-loss curves
    baselines: tuple[str, ...]
    max_mb_per_domain: float | None = None  # raw text per domain of the embedded corpus (None: all of it)
    per_layer_heads: bool = False  # a Grouter head per source layer (capture --layers all), else one shared head
    seed: int = 0  # of the target runs (initialisation and data order)
    routing_seed: int = 0  # of the source, the Grouter's distillation and its tuning: what makes the routing
    ranks: int = 4  # the demo's placement plan
    held_out_domain: str = "code"  # reproduce: the domain the source never sees
    fold_ablation: tuple[str, ...] = ()  # reproduce: other folding strategies, untuned
    causal_ablation: bool = False  # reproduce: a bidirectional Grouter too
    data: str | None = None  # a prepared dataset instead of the embedded corpus

    @classmethod
    def from_dict(cls, values: dict) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GrouterError(f"unknown experiment setting {unknown[0]!r}; the settings are {', '.join(sorted(known))}")
        tuples = {k: tuple(v) for k, v in values.items() if k in ("baselines", "fold_ablation")}
        return cls(**{**values, **tuples})


def load_config(name: str) -> dict:
    """``configs/NAME.toml`` as a dict."""
    path = CONFIGS / f"{name}.toml"
    with open(path, "rb") as f:
        return tomllib.load(f)


def scaled(config: dict, scale: str, **overrides) -> dict:
    """A config file's top-level settings with those of ``[scales.SCALE]`` and ``overrides`` in place
    (a table replaces the table it overrides)."""
    scales = config.get("scales", {})
    if scale not in scales:
        raise GrouterError(f"unknown scale {scale!r}; choose one of {', '.join(scales)}")
    base = {k: v for k, v in config.items() if k != "scales"}
    return {**base, **scales[scale], **overrides}


@dataclass
class Pipeline:
    """Runs the pipeline's stages into ``out``, each once (module docstring); ``tag`` prefixes its
    progress lines."""

    out: Path
    cfg: PipelineConfig
    tag: str
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of the stages run by this invocation

    def say(self, msg: str) -> None:
        print(f"[{self.tag}] {msg}", file=sys.stderr, flush=True)

    def stage(self, name: str, what: str, stage: Stage, overwrite: bool = False, **values) -> dict:
        """``stage`` into ``out/name``; its result, reused when the directory already holds it."""
        path = self.out / name
        self.say(what)
        t0 = time.perf_counter()
        outcome = stage.outcome(path, overwrite=overwrite, **values)
        if outcome.reused:
            self.say(f"  reused {path}")
        else:
            self.seconds[name] = time.perf_counter() - t0
        return outcome.result

    def data(self, existing: Path | None = None) -> PackedDataset:
        """The embedded corpus, prepared under ``out``, or a dataset the user prepared."""
        if existing is not None:
            return PackedDataset.open(existing)
        c = self.cfg
        self.stage("data", "preparing the embedded corpus", data_prepare, vocab_size=c.vocab_size,
                   seq_len=c.seq_len, max_mb_per_domain=c.max_mb_per_domain)
        return PackedDataset.open(self.out / "data")

    def subset(self, data: PackedDataset, domains: list[str]) -> PackedDataset:
        self.stage("data-source", f"the source's data: {', '.join(domains)} only", data_subset, data=data.path,
                   domains=domains)
        return PackedDataset.open(self.out / "data-source")

    def source_targets(self, data: PackedDataset, per_layer_heads: bool = False, top_m: int = 0,
                       capture_on: PackedDataset | None = None) -> Targets:
        """Train the source MoE on ``data`` and capture its first-layer router logits (``per_layer_heads``:
        every layer's, for a Grouter with per-layer heads; its artifacts are named ``...-layers-all``;
        ``top_m``: compact targets, named ``...-mM``) on ``data``, or on ``capture_on`` (named
        ``...-on-DIR``: a user's own corpus, which may hold domains the source never trained on)."""
        c = self.cfg
        schedule = TrainConfig(steps=c.source_steps, batch_size=c.batch_size, warmup_steps=20, eval_every=100,
                               checkpoint_every=100, seed=c.routing_seed)
        model = ModelOptions(**c.source)
        self.stage("source", f"training the source MoE ({model.n_experts} experts, top-{model.top_k}) on "
                   f"{', '.join(data.domains)}", source_train, data=data.path, router="aux", model=model,
                   schedule=schedule)
        name, which = ("targets-layers-all", "all layers'") if per_layer_heads else ("targets", "first-layer")
        name, which = (f"{name}-m{top_m}", f"{which} top-{top_m}") if top_m else (name, which)
        on = data if capture_on is None else capture_on
        name += "" if capture_on is None else f"-on-{on.path.name}"
        self.stage(name, f"capturing the source's {which} router logits on {', '.join(on.domains)}", capture,
                   source=self.out / "source", data=on.path, layers="all" if per_layer_heads else None, top_m=top_m)
        return Targets.open(self.out / name, on)

    def distilled(self, targets: Targets, causal: bool = True, head_groups: int | None = None) -> tuple[Path, dict]:
        """``grouter-distilled[-layers-all][-mM][-gG][-bidirectional]``: the name carries the targets'
        kind and the head groups."""
        name = "grouter-distilled" + targets.path.name.removeprefix("targets") + (
            f"-g{head_groups}" if head_groups else "") + ("" if causal else "-bidirectional")
        schedule = {**vars(distill_schedule()), "steps": self.cfg.distill_steps, "seed": self.cfg.routing_seed}
        kind = "causal" if causal else "bidirectional: leaks the future"
        summary = self.stage(name, f"distilling the Grouter ({kind})", distill, targets=targets.path,
                             architecture={**self.cfg.grouter, "causal": causal}, schedule=schedule,
                             head_groups=head_groups)
        return self.out / name, summary

    def folded(self, distilled: Path, data: PackedDataset, strategy: str = "affinity") -> Path:
        n = self.cfg.target_experts
        name = distilled.name.replace("grouter-distilled", "grouter-folded") + (
            "" if strategy == "affinity" else f"-{strategy}")
        self.stage(name, f"folding {distilled.name} to {n} experts ({strategy})", fold, grouter=distilled,
                   data=data.path, experts=n, strategy=strategy)
        return self.out / name

    def tuned(self, folded: Path, data: PackedDataset, variant: str = "", **options) -> Path:
        """The folded Grouter tuned for balance on ``data``; a ``variant`` (named ``...-tune-VARIANT``) with
        other :class:`grouter.tune.Options`."""
        name = folded.name.replace("grouter-folded", "grouter") + (f"-tune-{variant}" if variant else "")
        what = f"tuning {folded.name} for balance on the target data" + (f" ({variant})" if variant else "")
        self.stage(name, what, tune, grouter=folded, data=data.path, tokens=self.cfg.tune_tokens,
                   **{"seed": self.cfg.routing_seed, **options})
        return self.out / name

    def routing(self, grouter: Path, data: PackedDataset) -> Path:
        name = "routing" + grouter.name.removeprefix("grouter")
        self.stage(name, f"pre-dispatching {grouter.name}: routing store for every sequence", dispatch,
                   grouter=grouter, data=data.path)
        return self.out / name

    def train_target(self, data: PackedDataset, name: str, store: Path | None = None,
                     router: str | None = None) -> Path:
        """One target run, ``out/runs/NAME``: from a routing store, or with a baseline ``router``; the
        schedule, seed (hence data order) and body are the config's, so runs of one config compare at
        equal tokens."""
        c = self.cfg
        schedule = TrainConfig(steps=c.target_steps, batch_size=c.batch_size, warmup_steps=20,
                               eval_every=c.eval_every, checkpoint_every=100, seed=c.seed)
        if store is not None:
            s = RoutingStore.open(store, data=data)
            what = f"training the target with {store.name} ({s.n_experts} experts, top-{s.k}, seed {c.seed})"
            source, model = {"routing": store}, ModelOptions(**c.target)
        else:
            what = f"training the same target with the {router!r} router, same tokens (seed {c.seed})"
            source = {"router": router}
            model = ModelOptions(**c.target, n_experts=c.target_experts, top_k=c.source["top_k"])
        self.stage(f"runs/{name}", what, train, data=data.path, model=model, schedule=schedule, **source)
        return self.out / "runs" / name

    def train_targets(self, data: PackedDataset, routed: dict[str, Path], baselines: tuple[str, ...]) -> list[Path]:
        """Target runs at equal tokens and data order: one per routing store, one per baseline router."""
        return ([self.train_target(data, name, store=store) for name, store in routed.items()]
                + [self.train_target(data, router, router=router) for router in baselines])


def held_out_data(pipe: Pipeline, cfg: PipelineConfig) -> tuple[PackedDataset, PackedDataset]:
    """The targets' data (every domain) and the source's (every domain but the held-out one), each
    prepared once under ``pipe.out`` (the targets' is the user's ``cfg.data`` when given)."""
    data = pipe.data(Path(cfg.data) if cfg.data else None)
    if cfg.held_out_domain not in data.domains or len(data.domains) < 2:
        raise GrouterError(f"held-out domain {cfg.held_out_domain!r} must be one of the data's domains "
                           f"({', '.join(data.domains)}), with at least one other left for the source")
    return data, pipe.subset(data, [d for d in data.domains if d != cfg.held_out_domain])
