"""Shared fixtures: a tiny real-text dataset built in seconds, no downloads (the text:
:func:`grouter.testing.stdlib_documents`). Helpers the tests share are in :mod:`grouter.testing`."""

import pytest

from grouter.data import PackConfig, pack_documents, train_tokenizer
from grouter.testing import stdlib_documents


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """2 domains, vocabulary 512, 32-token sequences."""
    from grouter.formats.dataset import PackedDataset

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


@pytest.fixture(scope="session")
def megatron_text(tiny_data, tmp_path_factory):
    """Two Megatron indexed datasets of the tiny corpus's text, made as preprocess_data.py makes them (with
    tiny_data's tokenizer, --append-eod): ``docs`` (a document per item) and ``paragraphs`` (an item per
    paragraph, as --split-sentences gives an item per sentence). Their prefixes, by name."""
    from grouter.testing import megatron_indexed_dataset

    docs, root = stdlib_documents(), tmp_path_factory.mktemp("megatron_text")
    tokenizer, eos = tiny_data.tokenizer(), tiny_data.eos_id
    return {"docs": megatron_indexed_dataset(docs[:6], tokenizer, root / "docs" / "text_document", eos),
            "paragraphs": megatron_indexed_dataset(docs[6:10], tokenizer, root / "paragraphs" / "text_sentence", eos,
                                                   sentences=True)}
