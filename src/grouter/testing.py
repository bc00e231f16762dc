"""Fixtures for tests and benchmarks: routing stores with known structure, real text, small runs.

Synthetic stores are written by the same writer as ``grouter dispatch`` (:mod:`grouter.formats.store`),
so a change of the store's format reaches every test and benchmark at once.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from .chunking import row_chunks
from .formats.dataset import SPLITS, PackedDataset
from .formats.store import RoutingStore, write_store
from .routers import Heads, Routing


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


def train_run(data: PackedDataset, out: str | Path, model_cfg, cfg, command: str = "train", **kw) -> dict:
    """The trainer itself (:func:`grouter.train.train_model`) on any model config and routing source,
    outside the runner (no lock, no record): what the tests of training use. ``command``: the one the
    run directory records (``source train`` for a source)."""
    from .runner import Output
    from .train import train_model

    return train_model(data, Output(Path(out), {}, progress=False, command=command), model_cfg, cfg, **kw)


def tiny_reproduction(**overrides):
    """``grouter reproduce --scale smoke`` made smaller still: every stage of the experiments in seconds."""
    from .experiments.reproduce import reproduce_config

    return reproduce_config("smoke", **{**dict(max_mb_per_domain=0.1, vocab_size=512, seq_len=32, source_steps=10,
                                                distill_steps=10, tune_tokens=3_000, target_steps=10, eval_every=5),
                                        **overrides})


# -- real text, and the command line, for the tests -------------------------------------------------
STDLIB_MODULES = ["argparse", "json/decoder", "textwrap", "string", "fractions", "statistics", "csv", "calendar",
                  "heapq", "bisect", "shlex", "difflib", "glob", "fnmatch", "queue", "sched"]
# a tiny model and schedule for `grouter train` and `grouter source train`: seconds on a CPU
SMALL_TRAIN = ["--preset", "tiny", "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3",
               "--eval-sequences", "4"]


def stdlib_documents() -> list:
    """Real text that needs nothing but the interpreter: code from standard-library modules and prose
    from their docstrings (two domains)."""
    from .data import Document

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in STDLIB_MODULES:
        source = (root / f"{name}.py").read_text()
        docs.append(Document("code", name, source[:12_000]))  # keep fixtures small: tests stay fast
        tree = ast.parse(source)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        docs.append(Document("prose", name, "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))))
    return docs


def megatron_indexed_dataset(documents: list, tokenizer, prefix: str | Path, eod: int | None,
                             sentences: bool = False) -> Path:
    """A Megatron indexed dataset made as Megatron's ``tools/preprocess_data.py`` makes one (``--append-eod``;
    ``eod`` None: without it): each document tokenized, the end-of-document id appended to its last item, written
    with Megatron's own ``IndexedDatasetBuilder`` in the dtype it picks for the vocabulary. ``sentences``: each paragraph is an
    item of its own (what ``--split-sentences`` does with sentences; GPTDataset shuffles items)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tokenizer.get_vocab_size()))
    for doc in documents:
        parts = [p for p in doc.text.split("\n\n") if p.strip()] if sentences else [doc.text]
        ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in parts]
        ids = [x for x in ids if x]
        if ids and eod is not None:
            ids[-1].append(eod)
        if ids:
            builder.add_document([t for x in ids for t in x], [len(x) for x in ids])
    builder.finalize(f"{prefix}.idx")
    return prefix


def small_grouter(path: str | Path, vocab: int = 512, heads: Heads | None = None,
                  distilled_seq_len: int | None = 64, document_eos: int | None = None) -> Path:
    """A small random Grouter (16 experts, top-4) whose routes vary, saved in ``path``; it records the sequence
    length it was "distilled" on (dispatch's default window over a Megatron dataset's documents) and, with
    ``document_eos``, routes each document from its start (what a routing stream needs)."""
    from .formats.grouter import GrouterConfig
    from .network import Grouter

    cfg = GrouterConfig(vocab_size=vocab, n_experts=16, top_k=4, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                        max_seq_len=128, head_layers=list(heads.layers) if heads else [],
                        source_layers=heads.source_layers if heads else 0, document_eos=document_eos,
                        provenance={"distilled_seq_len": distilled_seq_len} if distilled_seq_len else {})
    g = Grouter(cfg)
    with torch.no_grad():
        g.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    g.save_pretrained(path)
    return Path(path)


def document_routing(g, tokens: np.ndarray, window: int, overlap: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing docs/method.md gives a document's tokens, computed directly (one forward per context, no
    batching, no padding): token t is routed with the context ``[s(t), t]``, s(t) = 0 below the window, else
    the largest multiple of ``window - overlap`` that leaves at least ``overlap`` tokens before t."""
    t = np.arange(len(tokens))
    stride = window - overlap
    s = np.where(t < window, 0, (t - overlap) // stride * stride)
    ids, weights = [], []
    for start in np.unique(s):
        mine = t[s == start]
        r = g.route(torch.from_numpy(np.asarray(tokens[start:mine.max() + 1], dtype=np.int64))[None], k)
        ids.append(r.ids[0, mine - start])
        weights.append(r.weights[0, mine - start])
    return torch.cat(ids), torch.cat(weights)


def indexed_items(prefix: str | Path) -> list[np.ndarray]:
    """Each item's tokens of a Megatron indexed dataset, read with Megatron's own IndexedDataset (copies: its
    views die with the reader)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(str(prefix))
    return [np.array(index.get(i)) for i in range(len(index))]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``grouter ARGV...`` in this process: (exit code, stdout, stderr), captured by pytest's ``capsys``."""
    from .cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    """A failed command: non-zero, its last stderr line ``error: ...`` holding ``needle``, no traceback."""
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], err
    assert "Traceback" not in err


def last_json(out: str) -> dict:
    """What ``--json`` printed: the last stdout line."""
    return json.loads(out.strip().splitlines()[-1])


def assert_nothing_written(out: Path) -> None:
    """Neither ``out`` nor a sibling of it (a ``.OUT.partial*`` scratch directory, the ``.OUT.lock``
    a command holds while it writes ``out``) exists."""
    assert not out.exists(), f"{out} was written"
    siblings = out.parent.iterdir() if out.parent.exists() else []
    leftovers = [p.name for p in siblings if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def tiny_demo(**overrides):
    """``grouter demo``'s pipeline at a size that runs in seconds."""
    from .experiments.demo import demo_config

    model = dict(d_model=32, n_layers=2, n_heads=2, d_expert=16)
    return demo_config(**{**dict(max_mb_per_domain=0.12, vocab_size=512, seq_len=32, source_steps=12, distill_steps=12,
                                  source=dict(model, n_experts=16, top_k=2), tune_tokens=4_000, target=model,
                                  grouter=dict(d_model=32, n_layers=1, n_heads=2, d_ff=64), target_experts=8,
                                  target_steps=12, batch_size=8, ranks=4), **overrides})


# megatron-core releases `make install` puts beside the one the `megatron` extra installs (0.16 on Python 3.11),
# each in its own pip --target directory: the tests of the release boundaries and of Megatron's trainer use them.
MEGATRON_RELEASES = ("0.17.1", "0.18.2", "0.19.2")


def megatron_release(version: str) -> Path:
    """The directory holding megatron-core ``version`` (put it first on ``sys.path`` / ``PYTHONPATH``)."""
    path = Path(sys.prefix) / "megatron-releases" / version
    if not (path / "megatron" / "core").is_dir():
        raise FileNotFoundError(f"megatron-core {version} is not installed in {path}; run `make install`")
    return path


# -- demo-shaped artifacts and documented commands, for the integration tests and benchmarks/gpu_check.sh --
def demo_like(root: str | Path, ranks: int = 4, seq_len: int = 32) -> Path:
    """``root/data``, ``root/routing-layers-all`` and ``root/plan-layers-all`` shaped like ``grouter demo``'s
    (a store of 16 experts, top-4, a head per layer of a 4-layer source; a plan for ``ranks`` ranks),
    small: the stdlib text, vocabulary 512, synthetic clustered routing."""
    from .data import PackConfig, pack_documents, train_tokenizer

    root = Path(root)
    docs = stdlib_documents()
    pack_documents(docs, train_tokenizer((d.text for d in docs), vocab_size=512), root / "data",
                   PackConfig(seq_len=seq_len, val_fraction=0.1, seed=0))
    store_and_plan(PackedDataset.open(root / "data"), root / "routing-layers-all", root / "plan-layers-all", 16, 4, ranks,
                   heads=Heads((0, 1, 2, 3), 4))
    return root


def store_and_plan(data: PackedDataset, store_dir: Path, plan_dir: Path, n_experts: int, k: int, ranks: int,
                   global_batch: int | None = None, heads: Heads | None = None):
    """A clustered synthetic store for ``data`` (4 clusters, little noise; ``heads``: per-layer) and a placement
    plan of it for ``ranks`` ranks; returns the opened store."""
    from .place import Options, plan_placement

    synthetic_store(data, store_dir, n_experts, k, 4, seed=0, noise=0.1, decay=0.7, heads=heads)
    store = RoutingStore.open(store_dir, data=data)
    Path(plan_dir).mkdir()
    plan_placement(store, Options(ranks=ranks, global_batch=global_batch, clusters=16, seed=0)).save(plan_dir)
    return store


def documented_command(doc: str | Path, *needles: str) -> str:
    """The one fenced ``bash`` block of ``doc`` that holds every one of ``needles``, as written."""
    blocks = re.findall(r"```bash\n(.*?)```", Path(doc).read_text(), flags=re.S)
    found = [b for b in blocks if all(n in b for n in needles)]
    if len(found) != 1:
        raise ValueError(f"{doc} has {len(found)} bash blocks with {needles}, not one")
    return found[0]
