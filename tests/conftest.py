"""Shared fixtures: a tiny real-text dataset built in seconds, no downloads.

Prose comes from the docstrings of standard-library modules and code from their source, so the
fixture needs nothing but the interpreter.
"""

import pytest

from grouter.data import PackConfig, pack_documents, train_tokenizer
from grouter.testing import stdlib_documents


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
