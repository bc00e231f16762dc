"""What differs between the megatron-core releases the adapter supports, in one place.

Each boundary names the release where Megatron changed something the adapter touches, and what the
adapter does about it; tests/test_megatron_versions.py checks each against the releases on both sides.
Releases 0.17+ declare Python >= 3.12; their cp311 wheels run on 3.11 except ``megatron.training``
0.18+, which imports ``typing.override`` (3.12; tests add it on 3.11).
"""

from __future__ import annotations

import re

from ...errors import GrouterError

SUPPORTED = ">=0.16,<0.20"  # the range pyproject's `megatron` extra installs; tested 0.16.1, 0.17.1, 0.18.2, 0.19.2
OLDEST = (0, 16)

# MoELayer builds its router as ``router(config=, pg_collection=)``, from 0.17 also ``is_mtp_layer=``:
# GrouterRouter takes ``is_mtp_layer`` (default False) and uses it for an MTP layer's head.
ROUTER_IS_MTP_LAYER = (0, 17)
# ``megatron.training`` (pretrain(), its arguments, checkpointing) is in the megatron-core wheel from 0.17;
# with 0.16 it comes from a Megatron-LM checkout on PYTHONPATH.
TRAINER_IN_WHEEL = (0, 17)
# gpt_layer_specs gives ``mlp=functools.partial(MoELayer, submodules=MoESubmodules(...))`` from 0.18 (a
# ModuleSpec before): with_grouter_router walks partials too.
MOE_SPEC_IS_PARTIAL = (0, 18)
# ``megatron.core.utils.get_batch_on_this_cp_rank(batch, cp_group)`` takes a required ``is_hybrid_cp``
# from 0.18 (before ``cp_group``): :func:`cp_split` passes it.
CP_SPLIT_IS_HYBRID = (0, 18)
# ``megatron.training.pretrain()`` parses the arguments itself up to 0.17; from 0.18 the caller parses them
# (``parse_and_validate_args``) and passes a config container built from them first, and from 0.19 the
# model provider is a keyword argument: :func:`run_pretrain` calls each release its way.
PRETRAIN_TAKES_CONFIG = (0, 18)


def typing_override_on_python311() -> None:
    """``megatron.training`` 0.18+ imports ``typing.override`` (Python 3.12, which those releases declare);
    on 3.11, where their cp311 wheels install with --ignore-requires-python, supply typing_extensions' one."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def version_tuple(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a megatron-core version string (the installed one by default)."""
    found = re.match(r"(\d+)\.(\d+)", version or megatron_version())
    if not found:
        raise GrouterError(f"cannot read megatron-core version {version!r}; install megatron-core {SUPPORTED}")
    return int(found.group(1)), int(found.group(2))


def check_version(version: str | None = None) -> tuple[int, int]:
    """Refuse a megatron-core older than the adapter supports (its MoE router API differs)."""
    found = version_tuple(version)
    if found < OLDEST:
        raise GrouterError(f"megatron-core {version or megatron_version()} is older than the adapter supports; "
                           f"pip install 'megatron-core{SUPPORTED}'")
    return found


def trainer_import_hint() -> str:
    """Why ``megatron.training`` cannot be imported here, and the fix (one line)."""
    if version_tuple() < TRAINER_IN_WHEEL:
        return (f"megatron-core {megatron_version()} has no megatron.training (it ships from 0.17): put a Megatron-LM "
                "checkout of the same release on PYTHONPATH, or install megatron-core>=0.17")
    return f"megatron-core {megatron_version()} has megatron.training but it failed to import"


def cp_split(batch: dict, cp_group=None) -> dict:
    """Megatron's context-parallel split of a batch (``get_batch_on_this_cp_rank``), whatever the release."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if version_tuple() >= CP_SPLIT_IS_HYBRID:
        return get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def prebuilt_dataset_helpers() -> bool:
    """Let ``pretrain()`` start from a megatron-core wheel: its initialisation runs ``make`` in
    ``megatron/core/datasets`` to build the C++ dataset helpers, and exits when that fails; the wheel
    ships them compiled (``helpers_cpp*.so``) but without the Makefile. When there is no Makefile and
    the compiled helpers import, the rebuild is skipped (True); a source checkout builds as usual."""
    import importlib
    from pathlib import Path

    from megatron.core.datasets import utils

    if (Path(utils.__file__).parent / "Makefile").exists():
        return False
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False
    utils.compile_helpers = lambda: None
    return True


def run_pretrain(datasets_provider, model_provider, forward_step, extra_args_provider, args_defaults: dict) -> None:
    """Megatron's ``pretrain()`` for a GPT-style model with these providers, whatever the release."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    model_type = ModelType.encoder_or_decoder
    if version_tuple() < PRETRAIN_TAKES_CONFIG:
        pretrain(datasets_provider, model_provider, model_type, forward_step, extra_args_provider=extra_args_provider,
                 args_defaults=args_defaults)
        return
    import warnings

    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
    with warnings.catch_warnings():  # "a ModelConfig is recommended": a provider is what adds our router
        warnings.simplefilter("ignore", UserWarning)
        config = pretrain_cfg_container_from_args(args)
    pretrain(config, datasets_provider, model_type=model_type, forward_step_func=forward_step,
             model_provider=model_provider)
