"""Megatron's own GPTDataset over the user's indexed datasets, each sample carrying its routing.

``BlendedMegatronDatasetBuilder`` builds the datasets of ``--data-path`` (one prefix, or a blend) exactly as
``pretrain_gpt.py`` does, with :class:`RoutedGPTDataset` as the dataset class: Megatron's ``GPTDataset``,
whose items gain ``routing_ids`` / ``routing_weights``, sliced from the routing stream of the sample's prefix
(:mod:`grouter.formats.stream`) with the very (document, offset, length) pieces GPTDataset reads the
sample's tokens from (its document, sample and shuffle indices). Routing in a stream depends only on each
document's own tokens from its start, so a slice is the routing of those tokens whatever the sequence
length, blend or order (docs/method.md#routing-streams-for-megatron-indexed-datasets). Every item's tokens
are compared with the stream's prefix at the same rows before the item is returned, and the ``.bin``
chunks it read are verified against the checksums taken at dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from ...errors import GrouterError
from ...formats.stream import RoutingStream, check_prefix, prefix_files, span_rows
from ...integrity import file_sha256


@dataclass
class RoutedGPTDatasetConfig(GPTDatasetConfig):
    """Megatron's GPTDatasetConfig, plus the routing stream of each prefix the blend names."""

    grouter_streams: dict = field(default_factory=dict)  # str(prefix) -> RoutingStream


def sample_pieces(dataset: GPTDataset, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The documents, offsets and lengths GPTDataset reads sample ``idx``'s tokens from (its shuffle index,
    then the sample index's (document position, offset) at the sample's start and end in the document
    index), the extra token of ``add_extra_token_to_sequence`` included."""
    i = int(dataset.shuffle_index[idx])
    (begin, begin_offset), (end, end_offset) = dataset.sample_index[i], dataset.sample_index[i + 1]
    documents = np.asarray(dataset.document_index[int(begin):int(end) + 1], dtype=np.int64)
    offsets = np.zeros(len(documents), dtype=np.int64)
    offsets[0] = int(begin_offset)
    lengths = np.asarray(dataset.dataset.sequence_lengths[documents], dtype=np.int64) - offsets
    lengths[-1] = int(end_offset) + int(dataset.config.add_extra_token_to_sequence) - offsets[-1]
    return documents, offsets, lengths


class RoutedGPTDataset(GPTDataset):
    """Megatron's GPTDataset; each item also has ``routing_ids`` (long ``[L, k]``, ``[L, H, k]`` with per-layer
    heads) and ``routing_weights`` (float32, same shape), the stream's routing of the item's ``tokens``. Padding
    positions (a short last validation sample) get experts ``0..k-1`` with weight 0, and no loss."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        stream = config.grouter_streams.get(str(dataset_path))
        if stream is None:
            raise GrouterError(f"no routing stream was given for {dataset_path}; run `grouter dispatch --megatron-data "
                               f"{dataset_path}` and pass it with --grouter-routing")
        self.stream, self.bin = stream, stream.bin_checker(dataset_path)
        self.rows_of = stream.offsets()  # each document's first row in the stream (and token in .bin)
        self.tokens_map = np.memmap(prefix_files(dataset_path)[1], dtype=stream.manifest["prefix"]["token_dtype"],
                                    mode="r")

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        documents, offsets, lengths = sample_pieces(self, 0 if idx is None else idx)
        starts = self.rows_of[documents] + offsets
        self.bin.check_rows(starts * self.tokens_map.dtype.itemsize, lengths * self.tokens_map.dtype.itemsize)
        L = len(item["tokens"])
        rows = span_rows(starts, lengths)[:L]
        read = torch.from_numpy(self.tokens_map[rows].astype(np.int64))
        served = item["tokens"][:len(rows)]
        if not bool(((served == read) | (served == 0)).all()):  # GPTDataset writes 0 over pad-token ids
            raise GrouterError(f"sample {idx} of {self.dataset_path}: the tokens GPTDataset serves are not the stream's "
                               "at the rows its indices name; this megatron-core release cuts samples differently")
        routing = self.stream.rows(rows)
        item["routing_ids"], item["routing_weights"] = _padded(routing.ids, routing.weights, L)
        return item


def _padded(ids: torch.Tensor, weights: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of ``length`` positions: the rows given, then experts ``0..k-1`` with weight 0."""
    short = length - len(ids)
    if short == 0:
        return ids, weights
    k = ids.shape[-1]
    pad_ids = torch.arange(k).expand(short, *ids.shape[1:]).clone()
    return torch.cat([ids, pad_ids]), torch.cat([weights, torch.zeros(short, *weights.shape[1:])])


# -- the streams of a blend ----------------------------------------------------------------------------
def prefixes_of(blend, blend_per_split) -> list[str]:
    """Every prefix ``--data-path`` (or the per-split paths) names, once each, in order."""
    lists = [blend] if blend is not None else list(blend_per_split or [])
    return list(dict.fromkeys(p for b in lists if b is not None for p in b[0]))


def streams_for(prefixes: list[str], paths: list[str]) -> dict[str, RoutingStream]:
    """Each prefix's routing stream among ``paths``, matched by content (the SHA-256 of the prefix's ``.idx``
    and the size of its ``.bin``), not by name; refuses a prefix without one, and streams that a single router
    could not serve together (another Grouter, E, k or heads)."""
    streams = [RoutingStream.open(p) for p in paths]
    by_idx = {(s.manifest["prefix"]["idx_sha256"], s.manifest["prefix"]["bin"]["bytes"]): s for s in streams}
    out = {}
    for prefix in prefixes:
        idx, bin_ = prefix_files(check_prefix(prefix))
        stream = by_idx.get((file_sha256(idx), bin_.stat().st_size))
        if stream is None:
            raise GrouterError(f"none of the routing streams given (--grouter-routing) was made from {prefix}; run "
                               f"`grouter dispatch --megatron-data {prefix}` and add its output")
        out[prefix] = stream
    kinds = {(s.manifest["grouter_fingerprint"], s.n_experts, s.k, s.heads) for s in out.values()}
    if len(kinds) > 1:
        raise GrouterError("the routing streams of the blend were made by different Grouters (or E, k, heads); one "
                           "router serves them all: dispatch every prefix with the same Grouter")
    return out


# Megatron's GPTDatasetConfig field -> the argument pretrain_gpt.py sets it from (those a release has).
_CONFIG_ARGS = {
    "random_seed": "seed", "sequence_length": "seq_length", "split": "split",
    "multiple_validation_sets": "multiple_validation_sets", "full_validation": "full_validation",
    "num_dataset_builder_threads": "num_dataset_builder_threads", "path_to_cache": "data_cache_path",
    "mmap_bin_files": "mmap_bin_files", "reset_position_ids": "reset_position_ids",
    "reset_attention_mask": "reset_attention_mask", "eod_mask_loss": "eod_mask_loss",
    "create_attention_mask": "create_attention_mask_in_dataloader",
    "object_storage_cache_path": "object_storage_cache_path", "mid_level_dataset_surplus": "mid_level_dataset_surplus",
    "allow_ambiguous_pad_tokens": "allow_ambiguous_pad_tokens", "fast_cache_load": "dataloader_fast_cache_load",
    "defer_npy_index_mmap": "dataloader_defer_npy_index_mmap", "context_parallel_size": "context_parallel_size",
    "data_parallel_size": "data_parallel_size", "hybrid_context_parallel": "hybrid_context_parallel",
    "inter_document_masking": "dataloader_inter_document_masking",
}


def dataset_config(args, tokenizer, blend, blend_per_split, streams: dict) -> RoutedGPTDatasetConfig:
    """The GPTDatasetConfig ``pretrain_gpt.py`` builds from Megatron's arguments (the fields this release has),
    with the routing streams."""
    names = {f.name for f in fields(RoutedGPTDatasetConfig)}
    values = {key: getattr(args, arg) for key, arg in _CONFIG_ARGS.items() if key in names and hasattr(args, arg)}
    if "sequence_parallel_size" in names:
        values["sequence_parallel_size"] = args.tensor_model_parallel_size * bool(args.sequence_parallel)
    return RoutedGPTDatasetConfig(**values, blend=blend, blend_per_split=blend_per_split, tokenizer=tokenizer,
                                  grouter_streams=streams)


def build_routed_datasets(config: RoutedGPTDatasetConfig, num_samples, built_on_rank=lambda: True):
    """Train, validation and test datasets, built by Megatron's BlendedMegatronDatasetBuilder as pretrain_gpt.py
    builds them (a blend becomes Megatron's BlendedDataset over RoutedGPTDatasets)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    return BlendedMegatronDatasetBuilder(RoutedGPTDataset, num_samples, built_on_rank, config).build()


@dataclass(eq=False)
class Numbered(torch.utils.data.Dataset):
    """Item ``i`` of a built dataset with its index as ``sequence`` (what ``--grouter-trace`` records), the keys
    a GPT batch has and no others (a blend's ``dataset_id`` would be split like a sequence)."""

    dataset: object
    KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "routing_ids", "routing_weights")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {**{key: item[key] for key in self.KEYS if key in item}, "sequence": torch.tensor(i)}
