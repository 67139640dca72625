"""The process layout of a launched run, as `accelerate.Accelerator` will see it."""

from __future__ import annotations


def launched_state():
    """`PartialState` as `Accelerator` would make it: on CPU when `ACCELERATE_USE_CPU` is set (`accelerate launch
    --cpu`, or `--multi_gpu` on a machine without GPUs), where a bare `PartialState()` would see one process."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
