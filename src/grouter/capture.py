"""Capture: record the routing scores of MoE layers of a source model for every token of a dataset.

The targets are what distillation learns from, so the teacher never re-runs; their format
(``targets.json`` and ``{split}.logits``) is :mod:`grouter.formats.targets`.

A source is anything that follows :class:`RouterPrefix`: the built-in MoE LM here, Hugging Face
MoE checkpoints in :mod:`grouter.hf_source`. Only the prefix of the source that feeds the captured
gate is loaded and run (docs/method.md#capture).

Under torchrun, capture shards the sequences over the processes as pre-dispatch does
(:mod:`grouter.sharding`), and ``--device-map auto`` spreads a Hugging Face source over each
process's GPUs; ``--top-m`` writes compact targets (docs/method.md#compact-targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from .device import ProcessGroup
from .errors import GrouterError
from .formats.dataset import SPLITS, PackedDataset
from .formats.model import read_config
from .formats.run import finished_checkpoint
from .formats.targets import TargetsWriter, layer_fields, resolve_top_m, write_manifest
from .hf_source import HFRouterPrefix, describe_gates, is_hf_model_dir, resolve_layers
from .integrity import file_sha256, verify_file
from .model import MoEConfig, MoELM
from .options import COUNT, POSITIVE_INT, option, path_input
from .routers import AuxFreeRouter, RandomRouter
from .runner import Output, Stage
from .sharding import ShardedJob


class RouterPrefix(Protocol):
    """What capture needs of a source model: the scores its routers select experts by, per token.

    ``router_logits(input_ids [B, L])`` returns float32 ``[B, L, E]`` for one captured layer,
    ``[B, L, H, E]`` for H (``layers``, in increasing order, of the source's ``n_layers``): the
    scores whose top-k are the source's routing (raw gate logits for softmax routers; sigmoid
    scores plus the selection bias for aux-loss-free routers). ``score_function`` and
    ``includes_bias`` say which; ``describe()`` gives the exact formula (``scores``) and how experts
    are selected from them (``selection``: ``topk``, or ``group_limited_topk`` for DeepSeek-V3-style
    routers).
    """

    layers: list[int]
    n_layers: int
    n_experts: int
    top_k: int
    vocab_size: int
    score_function: str
    includes_bias: bool
    loaded_tensor_names: list[str]

    def router_logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...

    def check_tokenizer(self, data: PackedDataset) -> None: ...


class BuiltinRouterPrefix:
    """The prefix of a built-in MoE checkpoint up to the router of its deepest captured layer.

    Loads only the embedding, the blocks before that layer and, of that layer, the attention, the
    norms and the router: never its experts nor later blocks. ``layer`` (one) or ``layers`` (several,
    or ``"all"``) say which routers.
    """

    def __init__(self, path: str | Path, layer: int | None = None, device: torch.device | str = "cpu", *,
                 layers=None):
        path = finished_checkpoint(Path(path), "grouter source train")
        self.path = path
        meta = read_config(path)
        verify_file(path / "model.safetensors", meta.get("weights_sha256"), "source weights",
                    "re-create the source with `grouter source train`")
        cfg = MoEConfig.from_dict(meta["config"])
        self.n_layers = cfg.n_layers
        self.layers = resolve_layers(layer, layers, list(range(cfg.n_layers)), cfg.n_layers, "the source")
        if cfg.router in ("external", "hash", "stablemoe"):
            raise GrouterError(f"the source routes with {cfg.router!r}: its gate logits are not its learned routing; "
                               "capture from a source trained with a learned router (aux, zloss, auxfree, none)")
        self.data_info = meta.get("data", {})
        self.n_experts, self.top_k, self.vocab_size = cfg.n_experts, cfg.top_k, cfg.vocab_size
        # An aux-loss-free router selects by sigmoid scores plus its selection bias: record those.
        self.score_function = "sigmoid" if cfg.router == "auxfree" else "softmax"
        self.includes_bias = cfg.router == "auxfree"
        self.device = torch.device(device)
        self.model = self._load_prefix(meta["config"])

    @property
    def layer(self) -> int:
        """The captured layer, when one is captured."""
        if len(self.layers) > 1:
            raise GrouterError(f"this prefix captures layers {self.layers}; use .layers")
        return self.layers[0]

    def _load_prefix(self, config: dict) -> MoELM:
        """The blocks up to the deepest captured layer, with the weights of everything but that
        layer's experts."""
        last = self.layers[-1]
        model = MoELM(MoEConfig(**{**config, "n_layers": last + 1}))
        block = f"blocks.{last}.moe."
        wanted = sorted(k for k in model.state_dict() if k.startswith(("embed.", "blocks."))
                        and (not k.startswith(block) or k.startswith(block + "router.")))
        self.loaded_tensor_names = wanted
        try:
            with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
                missing = set(wanted) - set(f.keys())
                if missing:
                    raise GrouterError(f"source checkpoint {self.path} lacks {sorted(missing)[0]}; it is corrupt")
                state = {k: f.get_tensor(k) for k in wanted}
        except (OSError, RuntimeError) as e:  # safetensors reports a bad header as these
            raise GrouterError(f"source weights in {self.path} are corrupt or truncated "
                               f"({str(e).splitlines()[0]})") from None
        model.load_state_dict(state, strict=False)
        return model.to(self.device).eval()

    @torch.no_grad()
    def router_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, E]`` (one layer) or ``[B, L, H, E]``: each captured router's scores from its input."""
        m, l = self.model, input_ids.shape[1]
        cos, sin = m.rope_cos[:l], m.rope_sin[:l]
        ids = input_ids.to(self.device)
        x = m.embed(ids)
        scores = []
        for i, block in enumerate(m.blocks):  # Block.forward, unrolled to see each router's input
            x = x + block.attn(block.attn_norm(x), cos, sin)
            h = block.moe_norm(x)
            if i in self.layers:
                scores.append(self._scores(block.moe.router, h.float()))
            if i < self.layers[-1]:
                x = x + block.moe(h, ids, None)[0]
        return scores[0] if len(scores) == 1 else torch.stack(scores, dim=2)

    @staticmethod
    def _scores(router, h: torch.Tensor) -> torch.Tensor:
        weight = router.weight if isinstance(router, RandomRouter) else router.gate.weight
        logits = h @ weight.float().T
        if isinstance(router, AuxFreeRouter):
            return logits.sigmoid() + router.bias.float()
        return logits

    def describe(self) -> dict:
        scores = "sigmoid(H @ W^T) + b" if self.includes_bias else "H @ W^T"
        return {"kind": "builtin", "path": str(self.path), "n_experts": self.n_experts,
                "top_k": self.top_k, "weights_sha256": file_sha256(self.path / "model.safetensors"),
                "score_function": self.score_function, "includes_bias": self.includes_bias, "selection": "topk",
                **describe_gates([{"layer": x, "scores": scores} for x in self.layers], self.n_layers)}

    def check_tokenizer(self, data: PackedDataset) -> None:
        src = self.data_info.get("tokenizer_sha256")
        if src and src != data.meta.get("tokenizer_sha256"):
            raise GrouterError("the dataset was tokenized with another tokenizer than the source model's; "
                               "re-tokenize it with the source's tokenizer")


def open_source(path: str | Path, layer: int | None, device, layers=None, device_map: str | None = None) -> RouterPrefix:
    """A built-in checkpoint or a Hugging Face MoE directory, as a router prefix (``device_map``:
    a Hugging Face source spread over this process's GPUs)."""
    path = Path(path)
    if not path.exists():
        raise GrouterError(f"source {path} not found; pass a `grouter source train` output or a Hugging Face MoE "
                           "model directory")
    if is_hf_model_dir(path):
        return HFRouterPrefix(path, layer=layer, device=device, layers=layers, device_map=device_map)
    if device_map is not None:
        raise GrouterError(f"--device-map is for Hugging Face sources; {path} is a built-in source, which runs on "
                           "one device")
    return BuiltinRouterPrefix(path, layer=layer, device=device, layers=layers)


def check_vocab_against_source(prefix: RouterPrefix, data: PackedDataset) -> None:
    if data.vocab_size > prefix.vocab_size:
        raise GrouterError(f"the dataset's vocabulary ({data.vocab_size}) is larger than the source's embedding "
                           f"({prefix.vocab_size} rows): it was tokenized with another tokenizer")
    prefix.check_tokenizer(data)


# Flush the targets and record progress every this many batches (per rank, at common steps).
CHECKPOINT_EVERY = 64


def _capture_shard(prefix: RouterPrefix, split, writer: TargetsWriter, job: ShardedJob, batch_size: int,
                   progress: bool) -> None:
    """Fill this rank's sequences of ``{split}`` from where the last run of this job stopped."""
    name, n = split.name, len(split)
    lo, hi, first = job.shard(name, n, batch_size)
    maps = writer.maps(name, lo, hi)
    bar = tqdm(total=hi - lo, initial=first - lo, desc=f"capture {name}", unit="seq",
               disable=not progress or job.group.rank != 0, mininterval=2)

    def flush():
        for m in (maps or {}).values():
            m.flush()

    for a, b in job.batches(name, n, batch_size, flush, CHECKPOINT_EVERY):
        scores = prefix.router_logits(split.batch(np.arange(a, b))["input_ids"])
        half = scores.to(torch.float16)
        if not torch.isfinite(half).all():
            bad = "non-finite" if not torch.isfinite(scores).all() else "beyond float16 range"
            raise GrouterError(f"the source produced {bad} router scores for {name} sequence {a}+; "
                               "is the source checkpoint corrupt?")
        writer.put(maps, a - lo, half)
        bar.update(b - a)
    bar.close()


def layer_list(text: str) -> list[int] | str:
    """``--layers``: ``all``, or comma-separated layer indices."""
    if text.strip() == "all":
        return "all"
    return [COUNT.parse(part.strip()) for part in text.split(",")]


@dataclass
class Inputs:
    source: Path = path_input("a `grouter source train` output or a Hugging Face MoE directory (Qwen2/3-MoE, OLMoE, "
                              "Mixtral, ...)")
    data: Path = path_input("the dataset whose tokens to score")


@dataclass
class Options:
    layer: int | None = option(None, "MoE layer to capture (default: the first MoE layer)", range=COUNT,
                               exclusive="layers")
    layers: list[int] | str | None = option(None, "several MoE layers (or all of them): distill then gives one Grouter "
                                            "head per layer", parse=layer_list, metavar="L1,L2,...|all",
                                            exclusive="layers")
    top_m: int | None = option(None, "keep only the M highest scores of each layer per token and the log-sum-exp "
                               "of the others: compact targets, exact for distillation's KL on the kept experts "
                               "(default: M = 2k, twice the source's top-k, where that is fewer than its experts; "
                               "0: every score)", range=COUNT)
    batch_size: int = option(16, "sequences per source forward; resuming needs the same value", range=POSITIVE_INT,
                             memory=True)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process "
                         "uses cuda:LOCAL_RANK", how=True)
    device_map: str | None = option(None, "auto: spread a Hugging Face source over every GPU this process is given "
                                    "(all visible ones; under torchrun, its share of them), for a source larger "
                                    "than one device", choices=("auto",), how=True)


def run(inputs: Inputs, o: Options, out: Output) -> dict | None:
    """Write the targets directory; resumable (rerun the same command), atomic, and shardable over
    the processes of a torchrun launch (:mod:`grouter.sharding`: byte-identical to one process).

    ``layer``: the one MoE layer to capture (default: the first); ``layers``: several (a list of
    indices, or ``"all"`` MoE layers), one Grouter head each (docs/method.md#capture). ``top_m``:
    compact targets (docs/method.md#compact-targets; None: M = 2k, 0: every score). Returns (on rank
    0; None on the others) the summary, with ``bytes_per_token``: the score bytes per token, all layers.
    """
    data = PackedDataset.open(inputs.data)
    with ProcessGroup(o.device) as group:
        prefix = open_source(inputs.source, o.layer, group.device, o.layers, o.device_map)
        check_vocab_against_source(prefix, data)
        top_m = resolve_top_m(o.top_m, prefix.n_experts, prefix.top_k)
        source_info, fields = prefix.describe(), layer_fields(prefix.layers, prefix.n_layers, top_m)
        job = ShardedJob(out, {"source": source_info}, group, "capture")
        writer = TargetsWriter(job.work, data.seq_len, len(prefix.layers), prefix.n_experts, top_m)
        sizes = {name: len(data.split(name)) for name in SPLITS}
        for name in SPLITS:  # rank 0 sizes the files every rank writes into
            if group.rank == 0 and not writer.allocate(name, sizes[name]):
                job.forget(name)
        job.read()
        for name in SPLITS:
            _capture_shard(prefix, data.split(name), writer, job, o.batch_size, out.progress)
        group.barrier()
        if group.rank == 0:
            splits = {name: writer.entry(name, sizes[name]) for name in SPLITS}
            write_manifest(job.work, data, fields, source_info, prefix.n_experts, prefix.top_k, splits)
        job.finish()
        rank = group.rank
    if rank != 0:
        return None
    return {"targets": str(out.path), "n_experts": prefix.n_experts, "top_k": prefix.top_k,
            **{key: fields[key] for key in ("layer", "layers", "top_m") if key in fields},
            "score_function": prefix.score_function, "train_tokens": sizes["train"] * data.seq_len,
            "bytes_per_token": writer.bytes_per_token}


capture = Stage("capture", run, Inputs, Options, writes="resumable")
