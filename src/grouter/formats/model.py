"""The built-in MoE LM's checkpoint format: ``config.json`` (the artifact header, the model config,
the weights' checksum and what the checkpoint says of its data) beside ``model.safetensors``.

Written by training runs (their ``checkpoint/``) and ``grouter ep --save-model``; read by
:meth:`grouter.model.MoELM.from_pretrained` and by capture, which loads only the layers it needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import header, load_weights, read_manifest, save_weights

MODEL_FORMAT, MODEL_VERSION = "grouter-moe-lm", 2  # 2: the weights' checksum in config.json


def read_config(directory: str | Path) -> dict:
    """The ``config.json`` of a MoE LM checkpoint, header checked."""
    return read_manifest(Path(directory), "config.json", MODEL_FORMAT, MODEL_VERSION, "MoE checkpoint",
                         "grouter source train")


def save_model(directory: str | Path, config: dict, state: dict[str, torch.Tensor], extra: dict | None = None) -> None:
    save_weights(directory, state, {**header(MODEL_FORMAT, MODEL_VERSION), "config": config, **(extra or {})})


def load_model(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json, tensors)`` of a checkpoint, checksums verified."""
    return load_weights(Path(directory), MODEL_FORMAT, MODEL_VERSION, "MoE checkpoint", "grouter source train")
