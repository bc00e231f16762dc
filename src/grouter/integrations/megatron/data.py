"""Megatron-style datasets with grouter routing, and the sample order of an EP placement plan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...errors import GrouterError
from ...formats.dataset import PackedDataset
from ...formats.plan import Plan
from ...formats.store import RoutingStore


@dataclass(eq=False)
class GrouterGPTDataset(Dataset):
    """Sequence i of a split as Megatron's GPTDataset yields items, plus its stored routing.

    Keys: ``tokens``, ``labels`` (long ``[L]``), ``loss_mask`` (float ``[L]``; 0 at end-of-document
    tokens with ``eod_mask_loss``), ``position_ids``, ``attention_mask`` (bool ``[1, L, L]``, True =
    masked, with ``create_attention_mask``; Megatron's local attention on the CPU needs it) and, with a
    ``store``, ``routing_ids`` (long ``[L, k]``) and ``routing_weights`` (float32 ``[L, k]``); both
    ``[L, H, k]`` from a store with per-layer heads.
    """

    data: PackedDataset
    store: RoutingStore | None = None
    split: str = "train"
    create_attention_mask: bool = False
    eod_mask_loss: bool = False

    def __post_init__(self):
        self.source = self.data.split(self.split)
        if self.store is None:
            return
        if self.store.manifest["dataset_fingerprint"] != self.data.fingerprint:
            raise GrouterError(f"routing store {self.store.path} was made for another dataset; run `grouter "
                               "dispatch` on this one")
        if self.store.seq_len != self.data.seq_len or self.store.n_sequences(self.split) != len(self.source):
            raise GrouterError(f"routing store {self.store.path} does not match the dataset's {self.split} split")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = torch.from_numpy(self.source.sequences([i])[0])
        tokens, labels = seq[:-1], seq[1:]
        length = len(tokens)
        item = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(length, dtype=torch.float32),
                "position_ids": torch.arange(length)}
        if self.eod_mask_loss:
            item["loss_mask"][tokens == self.data.eos_id] = 0.0
        if self.create_attention_mask:
            item["attention_mask"] = torch.ones(1, length, length, dtype=torch.bool).triu(1)
        if self.store is not None:
            routing = self.store.routing(self.split, [i])
            item["routing_ids"], item["routing_weights"] = routing.ids[0], routing.weights[0]
        return item


def plan_order(plan: Plan, micro_batch_size: int, dp_size: int) -> np.ndarray:
    """The plan's sequences in the order Megatron's pretraining sampler deals sample indices.

    Megatron's ``MegatronPretrainingSampler`` cuts its index stream into micro-steps of
    ``micro_batch_size x dp_size`` and gives data-parallel rank d the d-th ``micro_batch_size``
    of each: sample ``i`` of this order goes to the rank the plan names. With more data-parallel ranks
    than the plan's (EP < DP: ``G = dp_size / plan.ranks`` expert-parallel groups, group g being DP ranks
    ``g·EP .. g·EP+EP-1``, as Megatron lays them out), one Megatron global batch takes G consecutive plan
    batches, plan batch ``G·b + g`` to group g: each group runs a whole plan batch, so the placement is
    exact. The plan's short last batch, and a partial last set of G plan batches, are left out.
    """
    groups = check_plan_layout(plan, micro_batch_size, dp_size)
    share = plan.global_batch // plan.ranks
    full = min(sum(len(b) == share for b in batches) for batches in plan.samples)
    n_global = full // groups
    samples = np.stack([np.stack(batches[:n_global * groups]) for batches in plan.samples])  # [R, n, share]
    s = samples.reshape(plan.ranks, n_global, groups, share // micro_batch_size, micro_batch_size)
    return np.ascontiguousarray(s.transpose(1, 3, 2, 0, 4)).reshape(-1)  # (batch, micro-step, group, rank, j)


def check_plan_layout(plan: Plan, micro_batch_size: int, dp_size: int) -> int:
    """The number of expert-parallel groups (DP / plan ranks) a plan is dealt to; refuses what it cannot run."""
    if plan.algorithm != "balanced":
        raise GrouterError(f"the plan's {plan.algorithm!r} algorithm gives ranks unequal shares; make it with the "
                           "default --algorithm balanced")
    if dp_size % plan.ranks:
        raise GrouterError(f"the plan is for {plan.ranks} data-parallel ranks but world_size is {dp_size}; make a plan "
                           f"with --ranks {dp_size}, or with --ranks <expert-parallel size> dividing it")
    share = plan.global_batch // plan.ranks
    if share % micro_batch_size:
        raise GrouterError(f"each rank trains {share} sequences per global batch of the plan, which micro batches of "
                           f"{micro_batch_size} must divide; pick a micro batch size that divides it")
    groups = dp_size // plan.ranks
    if plan.n_batches < groups:
        raise GrouterError(f"the plan has {plan.n_batches} global batches, fewer than the {groups} expert-parallel "
                           "groups that each take one per step; make it with a smaller --global-batch")
    return groups


def check_plan_data(plan: Plan, dataset: GrouterGPTDataset) -> None:
    """Refuse a plan made for another split or dataset than ``dataset``'s."""
    if plan.split != dataset.split or plan.n_sequences > len(dataset):
        raise GrouterError(f"the plan is for {plan.n_sequences} sequences of split {plan.split!r}, the dataset has "
                           f"{len(dataset)} of {dataset.split!r}; make the plan from this dataset's routing")
    fp = plan.source.get("dataset_fingerprint")
    if fp is not None and fp != dataset.data.fingerprint:
        raise GrouterError("the plan was made from routing of another dataset; make it from this dataset's routing")


@dataclass(eq=False)
class OrderedSamples(Dataset):
    """Sample ``i`` is item ``order[i mod len(order)]`` of ``dataset``, for ``n_samples`` samples (epochs
    repeat the order), with its index in ``dataset`` as ``sequence``: what Megatron's data loader reads.

    ``dataset`` is any map-style dataset of GPTDataset-style items (:class:`GrouterGPTDataset` today).
    Megatron's sampler resumes at its consumed-samples count, so a resumed run reads the same items.
    """

    dataset: Dataset
    order: np.ndarray
    n_samples: int

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = int(self.order[i % len(self.order)])
        return {**self.dataset[index], "sequence": torch.tensor(index)}


def plan_data_loader(dataset: GrouterGPTDataset, plan: Plan, dp_rank: int, dp_size: int, micro_batch_size: int,
                     consumed_samples: int = 0, **loader_kwargs) -> DataLoader:
    """Micro-batches of the sequences the plan gives data-parallel rank ``dp_rank``, global batch after
    global batch, in the order of :func:`plan_order` (EP < DP included); ``consumed_samples``: samples
    of all ranks already trained (Megatron's ``consumed_train_samples``), to resume where a run stopped."""
    if not 0 <= dp_rank < dp_size:
        raise GrouterError(f"rank {dp_rank} is outside 0..{dp_size - 1}")
    check_plan_data(plan, dataset)
    order = plan_order(plan, micro_batch_size, dp_size)
    step = micro_batch_size * dp_size
    if consumed_samples % step or not 0 <= consumed_samples <= len(order):
        raise GrouterError(f"consumed_samples={consumed_samples} is not a whole number of micro-steps of {step} "
                           f"samples within the plan's {len(order)}; pass Megatron's consumed_train_samples")
    mine = order[consumed_samples:].reshape(-1, dp_size, micro_batch_size)[:, dp_rank].reshape(-1)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=mine.tolist(), **loader_kwargs)
