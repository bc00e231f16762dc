"""Synthetic fixtures for tests and benchmarks: routing stores with known structure.

They are written by the same writer as ``grouter dispatch`` (:mod:`grouter.store`), so a change of
the store's format reaches every test and benchmark at once.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .data import SPLITS, PackedDataset
from .place import row_chunks
from .routers import Heads, Routing
from .store import write_store


def synthetic_routing(n_sequences: int, seq_len: int, n_experts: int, k: int, clusters: int, seed: int = 0,
                      noise: float = 0.3, decay: float = 0.5, skew: float = 0.0,
                      out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clustered top-k routing ``[n, seq_len, k]`` and each sequence's cluster, for tests and benchmarks.

    Cluster c ranks the experts by a random permutation; slot j of a token picks the i-th preferred
    expert among the ranks congruent to j mod k, i geometric (``decay``) or, with probability
    ``noise``, uniform, so a token's k experts are distinct. ``skew``: cluster c has weight
    ``exp(-skew * c)``. ``out``: an array (e.g. a memmap) to fill.
    """
    if n_experts % k:
        raise ValueError("synthetic routing needs k to divide the number of experts")
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n_experts) for _ in range(clusters)]).ravel()
    w = np.exp(-skew * np.arange(clusters))
    cluster = rng.choice(clusters, size=n_sequences, p=w / w.sum())
    dtype = np.uint8 if n_experts <= 256 else np.uint16
    ids = np.empty((n_sequences, seq_len, k), dtype=dtype) if out is None else out
    per = n_experts // k
    log_q = math.log1p(-decay)
    for a, b in row_chunks(n_sequences, seq_len * k):
        c = b - a
        u = 1 - rng.random((c, seq_len, k), dtype=np.float32)  # (0, 1]
        i = np.minimum(np.floor(np.log(u) / log_q), per - 1).astype(np.int64)
        flip = rng.random((c, seq_len, k), dtype=np.float32) < noise
        i[flip] = rng.integers(0, per, size=int(flip.sum()))
        pos = i * k + np.arange(k)
        ids[a:b] = perms[(cluster[a:b].astype(np.int64) * n_experts)[:, None, None] + pos]
    return ids, cluster


def synthetic_weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gate weights: a seeded softmax over the k slots of each token."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def synthetic_store(data: PackedDataset | str | Path, out: str | Path, n_experts: int, k: int, clusters: int,
                    seed: int = 0, noise: float = 0.3, decay: float = 0.5, heads: Heads | None = None) -> Path:
    """A routing store for ``data`` (both splits) holding clustered synthetic routing.

    Expert ids from :func:`synthetic_routing` (``clusters`` sequence clusters, each
    preferring its own experts), gate weights from :func:`synthetic_weights`. ``heads``: per-layer
    routing, head ``h`` drawn like the one-head store of seed ``seed + h``.
    """
    data = data if isinstance(data, PackedDataset) else PackedDataset.open(data)
    routing = {}
    for i, name in enumerate(SPLITS):
        n = len(data.split(name))
        per_head = [synthetic_routing(n, data.seq_len, n_experts, k, clusters, seed=seed + h + 7919 * i, noise=noise,
                                      decay=decay)[0] for h in range(len(heads) if heads else 1)]
        ids = np.stack(per_head, axis=2) if heads else per_head[0]
        routing[name] = Routing(torch.from_numpy(ids.astype(np.int64)), synthetic_weights(ids.shape, seed * 31 + i),
                                heads=heads)
    return write_store(out, routing, n_experts, data=data, grouter_fingerprint=f"synthetic-{clusters}-{seed}")


# -- demo-shaped artifacts and documented commands, for the integration tests and benchmarks/gpu_check.sh --
STDLIB_MODULES = ["argparse", "json/decoder", "textwrap", "string", "fractions", "statistics", "csv",
                  "calendar", "heapq", "bisect", "shlex", "difflib", "glob", "fnmatch", "queue", "sched"]


def stdlib_documents() -> list:
    """Real text with no download: prose from the docstrings of standard-library modules, code from
    their source (the first 12,000 characters of each, to stay small)."""
    import ast
    import sysconfig

    from .data import Document

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in STDLIB_MODULES:
        source = (root / f"{name}.py").read_text()
        docs.append(Document("code", name, source[:12_000]))
        tree = ast.parse(source)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        docs.append(Document("prose", name, "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))))
    return docs


def demo_like(root: str | Path, ranks: int = 4, seq_len: int = 32) -> Path:
    """``root/data``, ``root/routing`` and ``root/plan`` shaped like ``grouter demo``'s (a store of 16
    experts, top-4; a plan for ``ranks`` ranks), small: the stdlib text, vocabulary 512, synthetic
    clustered routing."""
    from .data import PackConfig, pack_documents, train_tokenizer

    root = Path(root)
    docs = stdlib_documents()
    pack_documents(docs, train_tokenizer((d.text for d in docs), vocab_size=512), root / "data",
                   PackConfig(seq_len=seq_len, val_fraction=0.1, seed=0))
    store_and_plan(PackedDataset.open(root / "data"), root / "routing", root / "plan", 16, 4, ranks)
    return root


def store_and_plan(data: PackedDataset, store_dir: Path, plan_dir: Path, n_experts: int, k: int, ranks: int,
                   global_batch: int | None = None):
    """A clustered synthetic store for ``data`` (4 clusters, little noise) and a placement plan of it for
    ``ranks`` ranks; returns the opened store."""
    from .place import plan_placement
    from .store import RoutingStore

    synthetic_store(data, store_dir, n_experts, k, 4, seed=0, noise=0.1, decay=0.7)
    store = RoutingStore.open(store_dir, data=data)
    Path(plan_dir).mkdir()
    plan_placement(store, ranks, global_batch=global_batch, clusters=16, seed=0).save(plan_dir)
    return store


def documented_command(doc: str | Path, *needles: str) -> str:
    """The one fenced ``bash`` block of ``doc`` that holds every one of ``needles``, as written."""
    import re

    blocks = re.findall(r"```bash\n(.*?)```", Path(doc).read_text(), flags=re.S)
    found = [b for b in blocks if all(n in b for n in needles)]
    if len(found) != 1:
        raise ValueError(f"{doc} has {len(found)} bash blocks with {needles}, not one")
    return found[0]
