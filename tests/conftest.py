"""Shared fixtures: a tiny real-text dataset built in seconds, no downloads.

Prose comes from the docstrings of standard-library modules and code from their source, so the
fixture needs nothing but the interpreter.
"""

import ast
import sysconfig
from pathlib import Path

import pytest

from grouter.data import Document, PackConfig, pack_documents, train_tokenizer

MODULES = ["argparse", "json/decoder", "textwrap", "string", "fractions", "statistics", "csv",
           "calendar", "heapq", "bisect", "shlex", "difflib", "glob", "fnmatch", "queue", "sched"]


def stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in MODULES:
        source = (root / f"{name}.py").read_text()
        docs.append(Document("code", name, source[:12_000]))  # keep the fixture small: tests stay fast
        tree = ast.parse(source)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        prose = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))
        docs.append(Document("prose", name, prose))
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """2 domains, vocabulary 512, 32-token sequences."""
    from grouter.data import PackedDataset

    docs = stdlib_documents()
    tokenizer = train_tokenizer((d.text for d in docs), vocab_size=512)
    out = tmp_path_factory.mktemp("data") / "tiny"
    pack_documents(docs, tokenizer, out, PackConfig(seq_len=32, val_fraction=0.1, seed=0))
    return PackedDataset.open(out)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def megatron_cpu():
    """One gloo process, Megatron's parallel state (all sizes 1) and the CPU stubs of
    grouter.integrations.megatron.cpu, for megatron-core in this process; all undone afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from grouter.device import free_port
    from grouter.integrations.megatron.cpu import cpu_stubs

    created = not dist.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        cpu_stubs(mp.setattr)
        if created:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        yield
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
