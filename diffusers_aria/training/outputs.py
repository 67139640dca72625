"""What a run writes at its end: the student pipeline, the model card, run info; the output folder's guard."""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING, Any

import torch

from ..utils.atomic import atomic_write_json
from ..utils.file_names import TEACHER_REPORT

if TYPE_CHECKING:
    from ..teachers.parts import TeacherParts


class OutputDirError(ValueError):
    """The output folder holds a previous run and neither resume nor overwrite was asked for."""


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a non-empty folder (nothing is deleted either way)."""
    if resuming or overwrite or not os.path.isdir(output_dir):
        return
    entries = sorted(os.listdir(output_dir))
    if entries:
        shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
        raise OutputDirError(
            f"--output_dir {output_dir!r} is not empty (it holds {shown}); pass --resume_from_checkpoint latest to "
            "continue that run, --overwrite_output_dir to write into it anyway (nothing is deleted), or choose a new folder"
        )


def loggable_config(args) -> dict[str, Any]:
    """The run's flags for trackers: scalars only, no secrets (the secret names of `hub.is_secret_key`)."""
    from ..publish.hub import is_secret_key

    out = {}
    for k, v in vars(args).items():
        if is_secret_key(k):
            continue
        out[k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
        if out[k] is None:
            out[k] = "None"
    return out


def save_student_pipeline(output_dir: str, student, teacher: TeacherParts, lora: bool = False) -> None:
    """Write a pipeline folder of the teacher's class with the student denoiser into `output_dir` (plus LoRA
    weights), loadable with `DiffusionPipeline.from_pretrained(output_dir)`.

    With `lora=True` the pipeline holds the base student and `pytorch_lora_weights.safetensors` its adapters,
    loadable with `pipe.load_lora_weights(output_dir)` (PixArt: `pipe.transformer.load_lora_adapter`). The
    pipeline is float32 throughout, whatever the training precision: load it with `torch_dtype=` to run it in
    half precision.
    """
    from ..distillation import base_state_dict

    tmp = os.path.join(output_dir, ".pipeline.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = student
    if lora:
        model = type(student).from_config(student.config)
        model.load_state_dict(base_state_dict(student))
    teacher.make_pipeline(model, teacher.float32_components()).save_pretrained(tmp)
    if lora:
        teacher.family.save_lora(student, tmp)
    for name in os.listdir(tmp):
        dst = os.path.join(output_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)
    shutil.rmtree(tmp, ignore_errors=True)


def gather_state_hashes(accelerator, callback) -> list[str]:
    """A sha256 of the ARIA state on every rank (they must all be equal), gathered to every rank."""
    import hashlib

    from accelerate.utils import gather_object

    from ..callback import flatten_state

    tensors, plain = flatten_state(callback.state_dict())
    h = hashlib.sha256(json.dumps(plain, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return gather_object([h.hexdigest()]) if accelerator.num_processes > 1 else [h.hexdigest()]


def write_run_info(output_dir: str, **info) -> None:
    """`run_info.json`: how the run went (processes, steps, ...), for people and tests."""
    atomic_write_json(os.path.join(output_dir, "run_info.json"), info)


def write_card(args, report_paths: dict, validation_image: str | None, settings, init_report,
               device: str = "cuda", teacher: TeacherParts | None = None) -> str:
    """The model card: license from --license or the teacher's card, usage in the run's precision on `device`,
    with the teacher's pipeline class."""
    from ..publish.model_card import write_model_card

    pipeline_class = (teacher.pipeline_class if teacher is not None else None) or "StableDiffusionPipeline"
    lora_load = teacher.family.lora_usage if teacher is not None else None

    with open(report_paths["json"]) as fh:
        report = json.load(fh)
    report.pop("history", None)
    teacher_report = None
    tr = os.path.join(args.pretrained_model_name_or_path, TEACHER_REPORT)
    if os.path.isfile(tr):
        with open(tr) as fh:
            teacher_report = json.load(fh)
    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(args.mixed_precision or "no", "float32")
    return write_model_card(
        args.output_dir, base_model=args.pretrained_model_name_or_path, repo_id=args.hub_model_id,
        architecture=args.student_architecture, student_mode=args.student_mode, aria_settings=settings.to_dict(),
        aria_report=report, validation_image=validation_image, allocation_plot=report_paths.get("plot"),
        train_settings={**loggable_config(args), "student_init": str(init_report)},
        teacher_report=teacher_report, license=args.license, torch_dtype=dtype, device=device,
        pipeline_class=pipeline_class, lora_load=lora_load)


def end_run(accelerator) -> None:
    """`accelerator.end_training()` in an order that cannot deadlock gloo at exit.

    Call it after the last reference to the prepared (DDP-wrapped) models is gone from the caller. DDP's C++
    `Reducer` holds the process group. When the Reducer is the group's last owner, the group is destroyed
    with the GIL held, and its destructor joins gloo's worker threads, one of which may be waiting for the
    GIL to free the tensors of a finished collective (pytorch/pytorch#56297): an intermittent hang of
    a rank at exit, after all of its outputs are written. Here every rank arrives together, the accelerator
    drops its references to the models, and the last owner of the group is its Python handle, whose
    destructor releases the GIL.
    """
    import gc

    accelerator.wait_for_everyone()
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    del group
