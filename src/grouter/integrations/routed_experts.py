"""Routing as ``routed_experts``: each token's top-k expert ids per MoE layer, ``[batch, seq, layers, k]``.

That is the layout inference and RL stacks exchange routing in (vLLM's and SGLang's returned routed
experts, NeMo-RL's routing replay, Megatron's ``RouterReplay`` per layer): ids only, no gate weights.
Converting both ways lets a routing store serve RL routing replay (export) and a replay log be planned by
``grouter place`` (import, then :func:`grouter.place.plan_placement` on the store).

* :func:`export_routed_experts`: a store's split as ``[n, seq_len, layers, k]`` int64 ids: a one-head
  store gives every layer the same routing; a per-layer store gives layer ``l`` its head (by relative
  depth, as training does).
* :func:`import_routed_experts`: arrays per split into a routing store, written by grouter's own
  :func:`grouter.formats.store.write_store`. One layer makes a one-head store, several a per-layer store whose
  head ``l`` is layer ``l``. Without weights (the usual case), every id gets the gate weight ``1/k``
  and the store's Grouter fingerprint is :data:`IDS_ONLY`, so that nothing mistakes the uniform
  weights for a router's: train from such a store with Megatron's own router driven by
  :func:`grouter.integrations.megatron.replay.drive_router_replay` (ids replayed, weights from the
  live router), or plan it (``grouter place`` uses ids only).
* :func:`save_routed_experts` / :func:`load_routed_experts`: ``.npy`` or ``.safetensors`` (tensor
  ``routed_experts``).
* :func:`record_routed_experts`: the routing a trained built-in model (a ``grouter train`` run with any
  router: ``aux``, ``stablemoe``, ...) gives a split, every layer's, as it routes in training; with
  :func:`import_routed_experts` it becomes a per-layer store, so ``grouter place --hardware
  --compare-routing`` can set a learned router's step time beside the Grouter's (docs/steptime.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..artifacts import load_safetensors, save_safetensors
from ..chunking import batches_of
from ..errors import GrouterError
from ..formats.dataset import PackedDataset
from ..formats.run import finished_checkpoint
from ..formats.store import RoutingStore, write_store
from ..routers import Heads, Routing

IDS_ONLY = "routed-experts-ids-only"
KEY = "routed_experts"


def export_routed_experts(store: RoutingStore, split: str = "train", n_layers: int | None = None,
                          idx: np.ndarray | None = None) -> np.ndarray:
    """``[n, seq_len, layers, k]`` expert ids of ``split`` (sequences ``idx``, default all) for a model of
    ``n_layers`` MoE layers (default: one per head, or 1 for a one-head store)."""
    ids = store.ids(split) if idx is None else store.ids(split)[np.asarray(idx)]
    ids = torch.from_numpy(np.asarray(ids).astype(np.int64))
    heads = store.heads
    if heads is None:
        return ids.unsqueeze(2).expand(-1, -1, n_layers or 1, -1).numpy().copy()
    per_layer = heads.for_target(n_layers or len(heads))
    return ids[:, :, list(per_layer)].numpy()


def import_routed_experts(out: str | Path, arrays: dict[str, np.ndarray], n_experts: int, data=None,
                          weights: dict[str, np.ndarray] | None = None, overwrite: bool = False) -> Path:
    """A routing store at ``out`` from ``routed_experts`` ids ``[n, seq_len, layers, k]`` per split (and
    their gate weights, same shape, if known); ``data``: the dataset whose split order they follow."""
    shapes = {tuple(np.shape(a))[2:] for a in arrays.values()}
    if not arrays or len(shapes) != 1 or any(np.ndim(a) != 4 for a in arrays.values()):
        raise GrouterError("routed_experts must be [batch, seq, layers, k] arrays with the same layers and k in "
                           f"every split; got {[list(np.shape(a)) for a in arrays.values()]}")
    n_layers, k = shapes.pop()
    heads = Heads(tuple(range(n_layers)), n_layers) if n_layers > 1 else None
    routing = {}
    for split, ids in arrays.items():
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        _check_ids(ids, n_experts, split, data)
        w = (torch.full(ids.shape, 1.0 / k) if weights is None else
             torch.as_tensor(np.asarray(weights[split]), dtype=torch.float32))
        if w.shape != ids.shape:
            raise GrouterError(f"weights of split {split!r} are {list(w.shape)}, the ids {list(ids.shape)}")
        if heads is None:
            ids, w = ids[:, :, 0], w[:, :, 0]
        routing[split] = Routing(ids, w, heads=heads)
    return write_store(out, routing, n_experts, data=data, overwrite=overwrite,
                       grouter_fingerprint=IDS_ONLY if weights is None else "routed-experts",
                       grouter_path="routed_experts")


def _check_ids(ids: torch.Tensor, n_experts: int, split: str, data) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        raise GrouterError(f"routed_experts of split {split!r} hold ids outside 0..{n_experts - 1}; pass the "
                           "model's number of experts")
    if ids.shape[-1] > 1 and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
        raise GrouterError(f"routed_experts of split {split!r} name an expert twice for one token (k distinct ids "
                           "per token and layer are needed)")
    if data is not None and (ids.shape[0] != len(data.split(split)) or ids.shape[1] != data.seq_len):
        raise GrouterError(f"routed_experts of split {split!r} are {ids.shape[0]} x {ids.shape[1]} tokens but the "
                           f"dataset has {len(data.split(split))} sequences of {data.seq_len}; export them for "
                           "this dataset's sequences, in its order")


def save_routed_experts(path: str | Path, ids: np.ndarray) -> Path:
    """Write ``[batch, seq, layers, k]`` ids as ``.npy`` or ``.safetensors`` (tensor ``routed_experts``)."""
    path = Path(path)
    if path.suffix == ".npy":
        np.save(path, np.asarray(ids))
    elif path.suffix == ".safetensors":
        save_safetensors(path, {KEY: torch.as_tensor(np.asarray(ids))})
    else:
        raise GrouterError(f"{path}: routed_experts are written as .npy or .safetensors")
    return path


def load_routed_experts(path: str | Path) -> np.ndarray:
    """Read ids written by :func:`save_routed_experts` (or by another stack in the same layout)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".safetensors":
        tensors = load_safetensors(path, "routed_experts")
        if KEY not in tensors:
            raise GrouterError(f"{path} has no tensor {KEY!r} (it has {sorted(tensors)})")
        return tensors[KEY].numpy()
    raise GrouterError(f"{path}: routed_experts are read from .npy or .safetensors")


@torch.no_grad()
def record_routed_experts(run: str | Path, data: PackedDataset, split: str = "train", batch_size: int = 64,
                          max_sequences: int | None = None) -> np.ndarray:
    """``[n, seq_len, layers, k]`` expert ids every MoE layer of the finished built-in run ``run`` (or a
    model directory) chooses for the sequences of ``data``'s ``split`` (its first ``max_sequences``):
    the model's own forward pass in eval mode, so each router selects as it does in training (a
    frozen StableMoE router by its token embedding, ``auxfree`` with its bias)."""
    from ..model import MoELM  # torch model code: on use

    model = MoELM.from_pretrained(finished_checkpoint(Path(run), "grouter train")).eval()
    if model.cfg.router == "external":
        raise GrouterError(f"{run} routes with stored routing (router 'external'): record a run trained with its "
                           "own router (aux, stablemoe, ...)")
    if model.cfg.vocab_size < data.vocab_size:
        raise GrouterError(f"{run} has a vocabulary of {model.cfg.vocab_size} but {data.path} one of "
                           f"{data.vocab_size}: record on the dataset the run was trained on")
    rows = data.split(split)
    n = len(rows) if max_sequences is None else min(len(rows), max_sequences)
    out = np.empty((n, data.seq_len, model.cfg.n_layers, model.cfg.top_k), dtype=np.int16)
    with torch.no_grad():  # the routing only: no graph to keep
        for idx in batches_of(np.arange(n), batch_size):
            chosen = model(rows.batch(idx)["input_ids"]).routing_ids  # [layers, B, L, k]
            out[idx] = chosen.permute(1, 2, 0, 3).numpy()
    return out
