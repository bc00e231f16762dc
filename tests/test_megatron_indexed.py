"""Megatron's own GPTDataset over Megatron indexed datasets (made with its IndexedDatasetBuilder, as
preprocess_data.py makes them), built by its BlendedMegatronDatasetBuilder as pretrain_gpt.py builds them, each
sample carrying its routing sliced from the prefix's routing stream: checked token by token against the Grouter
run on each of the sample's documents from the document's start. In-process, on megatron-core in .venv (0.16);
tests/test_megatron_pretrain.py trains on it with Megatron's trainer (0.19)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grouter.dispatch import dispatch
from grouter.errors import GrouterError, one_line
from grouter.formats.stream import prefix_files
from grouter.integrations.megatron.arguments import check_args, check_sources
from grouter.integrations.megatron.indexed import (Numbered, RoutedGPTDatasetConfig, build_routed_datasets,
                                                   prefixes_of, sample_pieces, streams_for)
from grouter.network import Grouter
from grouter.testing import document_routing, indexed_items, small_grouter

BF16_TOL = 2 ** -8

SEQ = 48
WINDOW, OVERLAP = 64, 16


@pytest.fixture(scope="module")
def routed(megatron_text, tiny_data, tmp_path_factory):
    """A Grouter (each document from its start) and the routing stream of each of the two prefixes."""
    root = tmp_path_factory.mktemp("routed")
    small_grouter(root / "g", document_eos=tiny_data.eos_id)
    streams = {}
    for name, prefix in megatron_text.items():
        streams[name] = root / f"stream-{name}"
        dispatch(streams[name], grouter=root / "g", megatron_data=prefix, overlap=OVERLAP, batch_size=32,
                 progress=False)
    return {"grouter": root / "g", "streams": streams, "cache": root / "cache"}


def tokenizer(eod: int):
    """What GPTDataset asks of a tokenizer (megatron.training builds the real one from --tokenizer-type)."""
    return SimpleNamespace(vocab_size=512, eod=eod, pad=-1, unique_identifiers={"class": "test"})


def config(megatron_text, routed, tiny_data, blend, **kw) -> RoutedGPTDatasetConfig:
    paths = [str(p) for p in routed["streams"].values()]
    return RoutedGPTDatasetConfig(
        random_seed=1234, sequence_length=SEQ, blend=blend, split="90,10,0", tokenizer=tokenizer(tiny_data.eos_id),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(routed["cache"]),
        grouter_streams=streams_for(prefixes_of(blend, None), paths), **kw)


def test_each_sample_carries_the_routing_of_its_documents_from_their_starts(megatron_cpu, megatron_text, routed,
                                                                           tiny_data):
    """A blend of both prefixes (70/30) through BlendedMegatronDatasetBuilder: every sample's tokens are GPTDataset's,
    and its routing, token by token, is the Grouter's over each piece's document from the document's start
    (windows of 64, re-reading 16, for long ones), whatever piece of it the sample holds."""
    blend = ([str(megatron_text["docs"]), str(megatron_text["paragraphs"])], [0.7, 0.3])
    train, valid, _ = build_routed_datasets(config(megatron_text, routed, tiny_data, blend), [60, 12, 0])
    g = Grouter.from_pretrained(routed["grouter"])
    documents = {name: indexed_items(p) for name, p in megatron_text.items()}
    reference = {}  # (prefix, document) -> its routing, computed once
    spanning = 0
    for blended in (train, valid):
        for i in range(len(blended)):
            item = blended[i]
            name = ["docs", "paragraphs"][int(item["dataset_id"])]
            gpt = blended.datasets[int(item["dataset_id"])]
            docs, offsets, lengths = sample_pieces(gpt, int(blended.dataset_sample_index[i]))
            spanning += len(docs) > 1
            ids, weights = [], []
            for d, o, n in zip(docs, offsets, lengths):
                if (name, d) not in reference:
                    reference[name, d] = document_routing(g, documents[name][d], WINDOW, OVERLAP)
                ids.append(reference[name, d][0][o:o + n]), weights.append(reference[name, d][1][o:o + n])
            text = np.concatenate([documents[name][d][o:o + n] for d, o, n in zip(docs, offsets, lengths)])
            assert torch.equal(item["tokens"], torch.from_numpy(text[:SEQ].astype(np.int64)))
            assert item["routing_ids"].shape == (SEQ, 4) and item["routing_weights"].dtype == torch.float32
            assert torch.equal(item["routing_ids"], torch.cat(ids)[:SEQ]), (name, i)
            assert torch.allclose(item["routing_weights"], torch.cat(weights)[:SEQ], rtol=BF16_TOL, atol=1e-6)
    assert spanning >= 5 and len(train) >= 60 and len(valid) >= 12  # samples cut across documents: slicing matters
    numbered = Numbered(train)[3]
    assert set(numbered) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask", "routing_ids",
                             "routing_weights", "sequence"} and int(numbered["sequence"]) == 3


def test_streams_are_matched_to_prefixes_by_content(megatron_text, routed, tiny_data, tmp_path):
    paths = [str(p) for p in routed["streams"].values()]
    found = streams_for([str(megatron_text["paragraphs"]), str(megatron_text["docs"])], paths[::-1])
    assert {p: s.path.name for p, s in found.items()} == {str(megatron_text["paragraphs"]): "stream-paragraphs",
                                                          str(megatron_text["docs"]): "stream-docs"}
    with pytest.raises(GrouterError, match="none of the routing streams given .* was made from"):
        streams_for([str(megatron_text["docs"])], paths[1:])
    small_grouter(tmp_path / "other", distilled_seq_len=32, document_eos=tiny_data.eos_id)
    dispatch(tmp_path / "s", grouter=tmp_path / "other", megatron_data=megatron_text["docs"], progress=False)
    with pytest.raises(GrouterError, match="different Grouters"):
        streams_for([str(megatron_text["docs"]), str(megatron_text["paragraphs"])], [str(tmp_path / "s"), paths[1]])


def test_tokens_changed_after_dispatch_are_found_before_the_sample_is_served(megatron_cpu, megatron_text, routed,
                                                                            tiny_data, tmp_path):
    """The same size, another token: GPTDataset would serve it; the item is refused before it is used."""
    import shutil

    prefix = tmp_path / "copy" / "text_document"
    prefix.parent.mkdir()
    for src, dst in zip(prefix_files(megatron_text["docs"]), prefix_files(prefix)):
        shutil.copyfile(src, dst)
    cfg = config(megatron_text, routed, tiny_data, ([str(prefix)], None))
    train, _, _ = build_routed_datasets(cfg, [8, 0, 0])
    train[0]  # intact
    bin_ = prefix_files(prefix)[1]
    data = bytearray(bin_.read_bytes())
    data[5] ^= 1
    bin_.write_bytes(bytes(data))
    fresh, _, _ = build_routed_datasets(cfg, [8, 0, 0])
    with pytest.raises(GrouterError, match="tokens changed since `grouter dispatch`"):
        for i in range(len(fresh)):
            fresh[i]
    # Megatron's data loader reads in worker processes: PyTorch re-raises there with the worker's traceback, and
    # the entry point's command line (pretrain.cli) still prints the one line
    with pytest.raises(GrouterError) as err:
        list(torch.utils.data.DataLoader(Numbered(fresh), batch_size=2, num_workers=1))
    assert "\n" in str(err.value)
    line = one_line(err.value)
    assert "\n" not in line and "tokens changed since `grouter dispatch`" in line, line


def test_the_entry_point_takes_megatrons_data_with_routing_streams_only():
    base = dict(grouter_data=None, grouter_routing=None, grouter_online=None, grouter_replay=False, data_path=None)
    check_sources(SimpleNamespace(**{**base, "data_path": ["0.7", "a", "0.3", "b"], "grouter_routing": ["s1", "s2"]}))
    for wrong in ({"grouter_routing": None}, {"grouter_online": "g"}, {"grouter_data": "d", "grouter_routing": ["s"]}):
        with pytest.raises(GrouterError, match="with Megatron's --data-path give --grouter-routing"):
            check_sources(SimpleNamespace(**{**base, "data_path": ["a"], **wrong}))
    with pytest.raises(GrouterError, match="one routing store"):
        check_sources(SimpleNamespace(**{**base, "grouter_data": "d", "grouter_routing": ["s1", "s2"]}))


def test_the_entry_point_refuses_what_does_not_fit_megatrons_data(megatron_text, routed):
    """With --data-path: a vocabulary smaller than the data's token ids, and a plan made from a routing store
    (it places grouter's packed sequences), are refused in one line."""
    streams = streams_for([str(megatron_text["docs"])], [str(p) for p in routed["streams"].values()])
    top = streams[str(megatron_text["docs"])].manifest["prefix"]["max_token_id"]
    args = SimpleNamespace(num_experts=16, padded_vocab_size=top + 1, expert_model_parallel_size=2,
                           use_legacy_models=None, spec=None, mock_data=None, sft=None)
    run = SimpleNamespace(data=None, streams=streams, plan=None)
    check_args(args, run, 2)
    for wrong, plan, match in ((dict(padded_vocab_size=top), None, f"token id {top}, beyond the model's vocabulary"),
                               ({}, SimpleNamespace(ranks=2, source={"kind": "store"}),
                                "with --data-path the plan must come from its routing streams")):
        with pytest.raises(GrouterError, match=match) as err:
            check_args(SimpleNamespace(**{**vars(args), **wrong}), SimpleNamespace(**{**vars(run), "plan": plan}), 2)
        assert "\n" not in str(err.value)
    check_args(args, SimpleNamespace(**{**vars(run), "plan": SimpleNamespace(ranks=2, source={"kind": "stream"})}), 2)
