"""What a run writes at its end (the student pipeline, the model card, run info), and its output folder's checks.

`OutputDirError` is `preflight`'s (imported here for the callers that know it from this module).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING, Any

import torch

from ..utils.atomic import atomic_write_json
from ..utils.file_names import TEACHER_REPORT
from .preflight import OutputDirError, plan_output_dir  # noqa: F401 - OutputDirError: re-exported

if TYPE_CHECKING:
    from ..teachers.parts import TeacherParts


def prepare_output_dir(args) -> str | None:
    """The training script's first step, before the models load: check the output folder (`plan_output_dir`:
    never the teacher's, the VAE's or a named regions folder, nor inside or above one; a previous run is resumed,
    refused, or with `--overwrite_output_dir` moved aside), say at once when `--resume_from_checkpoint latest`
    finds no checkpoint, and move an earlier run aside (`checkpointing.move_run_aside`, main process only).
    Every process checks before the folder changes. Returns where the earlier run went, or None."""
    from ..utils.processes import launched_state
    from .checkpointing import move_run_aside

    state = launched_state()  # as the Accelerator will see it (a bare PartialState() sees 1 process on CPU)
    plan = plan_output_dir(args)
    state.wait_for_everyone()  # every rank has looked at the folder before it changes
    moved = None
    if state.is_main_process:
        if plan.no_checkpoint:
            print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir!r} yet, starting a new run",
                  flush=True)
        if plan.action == "move":
            # the caches this run would make the same (its own regions, the teacher latents) are reused when they
            # match its settings (checked when they load)
            reuse = (("regions",) if not getattr(args, "regions_dir", None) else ()) + \
                (("teacher_latents",) if getattr(args, "image_free", False) else ())
            moved = move_run_aside(args.output_dir, reuse=reuse)
            print(f"--overwrite_output_dir: the earlier run in {args.output_dir!r} was moved to {moved!r} (nothing is "
                  "deleted; remove that folder when you no longer need it)", flush=True)
    state.wait_for_everyone()
    return moved


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
