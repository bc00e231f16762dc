"""Expert folding: adapt a Grouter with E_S outputs to a target model with E_T < E_S experts.

Source experts that fire together are merged (docs/method.md#expert-folding):
1. co-activation affinity ``P = RᵀR / N`` (diagonal zeroed) from the Grouter's top-k on data;
2. group sizes: ``E_S // E_T`` each, and ``E_S % E_T`` groups get one more;
3. greedy grouping. Seed rule: a new group starts from the unassigned expert with the largest
   summed affinity to the other unassigned experts (ties: lowest id); then the unassigned expert
   with the largest summed affinity to the group's members joins, until the group is full;
4. mapping ``M ∈ {0,1}^{E_S×E_T}`` and folded head ``W̃ = W·M``: a target expert's logit is the
   sum of its source experts' logits, so folding costs nothing at run time.
``random`` and ``balance`` (pair high-load with low-load experts) are the ablation strategies.

A Grouter with per-layer heads is folded head by head: each head gets its own grouping ``M_h``
from its own co-activation (a target layer's experts are its own, so the heads need not agree),
and ``W̃_h = W_h·M_h``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .artifacts import write_json
from .chunking import batches_of
from .device import resolve_device
from .errors import GrouterError
from .formats.dataset import DataSplit, PackedDataset
from .network import Grouter
from .options import POSITIVE_INT, SEED, option, path_input
from .plots import per_head_paths, plot_affinity
from .runner import Output, Stage

STRATEGIES = ("affinity", "random", "balance")


@torch.no_grad()
def coactivation(grouter: Grouter, split: DataSplit, k: int | None = None, max_sequences: int | None = None,
                 batch_size: int = 32, device: torch.device | str = "cpu", progress: bool = False):
    """Stream the data through the Grouter; returns (P [E,E] with zero diagonal, load [E], tokens),
    with a head axis first (``[H, E, E]``, ``[H, E]``) for per-layer heads."""
    E, H = grouter.cfg.n_experts, grouter.cfg.n_routing_heads
    n = len(split) if max_sequences is None else min(max_sequences, len(split))
    counts = torch.zeros(H, E, E, dtype=torch.float64, device=device)
    tokens = 0
    for idx in tqdm(batches_of(n, batch_size), desc="co-activation", disable=not progress, mininterval=2,
                    total=-(-n // batch_size)):
        ids = grouter.route(split.batch(idx)["input_ids"].to(device), k).ids
        ids = ids.reshape(-1, H, ids.shape[-1])
        hits = torch.zeros(ids.shape[:-1] + (E,), device=device).scatter_(-1, ids, 1.0)  # [tokens, H, E]
        counts += torch.einsum("thi,thj->hij", hits, hits).double()
        tokens += hits.shape[0]
    if tokens == 0:
        raise GrouterError("no data to measure expert co-activation on; the split is empty")
    counts = counts.cpu().numpy()
    load = np.diagonal(counts, axis1=1, axis2=2).copy()
    for c in counts:
        np.fill_diagonal(c, 0.0)
    affinity = counts / tokens
    return (affinity[0], load[0], tokens) if H == 1 else (affinity, load, tokens)


def group_sizes(n_source: int, n_target: int) -> list[int]:
    if not 1 <= n_target < n_source:
        raise GrouterError(f"--experts must be between 1 and {n_source - 1} (fewer than the Grouter's {n_source}); "
                           f"got {n_target}")
    base, extra = divmod(n_source, n_target)
    return [base + 1] * extra + [base] * (n_target - extra)


def affinity_groups(affinity: np.ndarray, sizes: list[int]) -> list[list[int]]:
    """Greedy grouping by co-activation (seed rule in the module docstring)."""
    free = np.ones(len(affinity), dtype=bool)
    groups = []
    for size in sizes:
        seed = int(np.argmax(np.where(free, (affinity * free).sum(1), -np.inf)))
        members, free[seed] = [seed], False
        while len(members) < size:
            pull = affinity[:, members].sum(1)
            best = int(np.argmax(np.where(free, pull, -np.inf)))
            members.append(best)
            free[best] = False
        groups.append(sorted(members))
    return groups


def random_groups(n_source: int, sizes: list[int], seed: int = 0) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n_source)
    return [sorted(g.tolist()) for g in np.split(order, np.cumsum(sizes)[:-1])]


def balance_groups(load: np.ndarray, sizes: list[int]) -> list[list[int]]:
    """Pair high-load with low-load experts: heaviest first, each to the lightest group with room."""
    groups: list[list[int]] = [[] for _ in sizes]
    totals = np.zeros(len(sizes))
    for expert in np.argsort(-load, kind="stable"):
        room = np.array([len(g) < s for g, s in zip(groups, sizes)])
        target = int(np.argmin(np.where(room, totals, np.inf)))
        groups[target].append(int(expert))
        totals[target] += load[expert]
    return [sorted(g) for g in groups]


def mapping_matrix(groups: list[list[int]], n_source: int) -> np.ndarray:
    m = np.zeros((n_source, len(groups)), dtype=np.float32)
    for t, members in enumerate(groups):
        m[members, t] = 1.0
    return m


def fold_grouter(grouter: Grouter, groups: list, strategy: str, top_k: int | None = None) -> Grouter:
    """A new Grouter whose head is ``W·M`` (target logit = sum of its source experts' logits).

    ``groups``: the target experts' source experts; per head (a list of such lists) for per-layer heads.
    """
    per_head = groups if grouter.cfg.heads is not None else [groups]
    n_source, n_target = grouter.cfg.n_experts, len(per_head[0])
    k = top_k or grouter.cfg.top_k
    if k >= n_target:
        raise GrouterError(f"top-k {k} must be smaller than the target's {n_target} experts; pass a smaller --top-k "
                           "or fold to more experts")
    cfg = copy.deepcopy(grouter.cfg)
    cfg.n_experts, cfg.top_k = n_target, k
    cfg.provenance = {**cfg.provenance, "fold": {"strategy": strategy, "source_experts": n_source, "groups": groups}}
    folded = Grouter(cfg)
    state = grouter.state_dict()
    weights = grouter.head.weight.detach().float().cpu().view(len(per_head), n_source, -1)
    state["head.weight"] = torch.cat([torch.from_numpy(mapping_matrix(g, n_source)).T @ w
                                      for g, w in zip(per_head, weights)]).to(grouter.head.weight.dtype)
    state["selection_bias"] = torch.zeros(folded.score_shape)
    folded.load_state_dict(state)
    return folded.eval()


def make_groups(strategy: str, affinity: np.ndarray, load: np.ndarray, sizes: list[int], seed: int) -> list[list[int]]:
    if strategy == "affinity":
        return affinity_groups(affinity, sizes)
    if strategy == "random":
        return random_groups(len(load), sizes, seed)
    if strategy == "balance":
        return balance_groups(load, sizes)
    raise GrouterError(f"unknown folding strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def within_group_affinity(affinity: np.ndarray, groups: list[list[int]]) -> float:
    """Share of all co-activation mass that stays inside groups (what affinity folding maximises)."""
    inside = sum(affinity[np.ix_(g, g)].sum() for g in groups)
    return float(inside / max(affinity.sum(), 1e-12))


@dataclass
class Inputs:
    grouter: Path = path_input("the Grouter to fold (a distill run or a Grouter directory)")
    data: Path = path_input("data to measure co-activation on")


@dataclass
class Options:
    experts: int = option(help="target expert count (fewer than the Grouter's)", range=POSITIVE_INT)
    strategy: str = option("affinity", choices=STRATEGIES)
    top_k: int | None = option(None, "the target's top-k (default: the Grouter's)", range=POSITIVE_INT)
    max_sequences: int = option(2000, "sequences to measure affinity on", range=POSITIVE_INT, memory=True)
    seed: int = option(0, "for the random strategy", range=SEED)
    batch_size: int = option(32, range=POSITIVE_INT, cli=False)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N", how=True)


def run(inputs: Inputs, o: Options, out: Output) -> dict:
    """Fold the Grouter to ``o.experts``; writes the folded Grouter, its report and the heatmaps."""
    dev = resolve_device(o.device)
    data = PackedDataset.open(inputs.data)
    grouter = Grouter.from_pretrained(inputs.grouter).to(dev)
    grouter.check_data(data)
    sizes = group_sizes(grouter.cfg.n_experts, o.experts)
    if (o.top_k or grouter.cfg.top_k) >= o.experts:
        raise GrouterError(f"top-k {o.top_k or grouter.cfg.top_k} must be smaller than the target's {o.experts} "
                           "experts; pass a smaller --top-k or fold to more experts")
    affinity, load, tokens = coactivation(grouter, data.split("train"), max_sequences=o.max_sequences,
                                          batch_size=o.batch_size, device=dev, progress=out.progress)
    heads = grouter.cfg.heads  # none: one shared head
    affinities, loads = (affinity, load) if heads else (affinity[None], load[None])
    head_groups = [make_groups(o.strategy, a, x, sizes, o.seed + h) for h, (a, x) in enumerate(zip(affinities, loads))]
    groups = head_groups if heads else head_groups[0]
    folded = fold_grouter(grouter.cpu(), groups, o.strategy, o.top_k)
    inside = [within_group_affinity(a, g) for a, g in zip(affinities, head_groups)]
    report = {"strategy": o.strategy, "source_experts": grouter.cfg.n_experts, "target_experts": o.experts,
              "top_k": folded.cfg.top_k, "group_sizes": [len(g) for g in head_groups[0]], "groups": groups,
              "tokens_measured": tokens, "within_group_affinity": float(np.mean(inside)),
              "seed_rule": "highest summed affinity to unassigned experts (ties: lowest id)",
              **({"head_layers": list(heads.layers), "within_group_affinity_per_head": inside} if heads else {}),
              **({"head_groups": list(heads.groups)} if heads and heads.groups else {})}
    with out.atomic() as tmp:
        folded.save_pretrained(tmp)
        write_json(tmp / "fold_report.json", report)
        np.save(tmp / "affinity.npy", affinity)
        for path, a, g, label in zip(per_head_paths(tmp / "affinity.png", heads), affinities, head_groups,
                                     heads.labels if heads else [None]):
            head = "" if label is None else f", head of source {label}"
            title = f"co-activation, {o.strategy} folding {grouter.cfg.n_experts}→{o.experts}{head}"
            plot_affinity(a, g, path, title=title)
    return {"grouter": str(out.path), **{k: v for k, v in report.items() if k != "groups"}}


fold = Stage("fold", run, Inputs, Options)
