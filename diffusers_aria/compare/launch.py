"""The command lines the comparison runs: `accelerate launch` of the training script (one per arm) and of the
generation worker.

`training_command` is the one place that knows where the training script is and which of its flags the
comparison sets; both arms get the same command but for `--allocation` and `--output_dir`.
"""

from __future__ import annotations

import os
import sys

#: The distillation script the arms run: the one shipped in the package (`diffusers-aria train`), as a module.
TRAIN_MODULE = "diffusers_aria.training.train_aria_distill"
#: --allocation of each arm
ARMS: dict[str, str] = {"rc": "rc", "aria": "aria"}


def accelerate_prefix(num_processes: int, mixed_precision: str = "no", cpu: bool | None = None) -> list[str]:
    """`accelerate launch` for `num_processes` processes on one machine (CPU processes use gloo: `--multi_gpu`
    with ACCELERATE_USE_CPU=true, see `launch_env`)."""
    if num_processes < 1:
        raise ValueError(f"num_processes {num_processes} is not valid; it must be at least 1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision",
           mixed_precision, "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        return cmd + ["--multi_gpu"]
    return cmd + (["--cpu"] if (cpu if cpu is not None else not _has_cuda()) else [])


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a requirement
        return False


def launch_env(cpu: bool | None = None) -> dict[str, str]:
    """The environment of a launch: CPU runs need ACCELERATE_USE_CPU for more than one process."""
    env = dict(os.environ)
    if cpu if cpu is not None else not _has_cuda():
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def training_command(settings: dict, arm: str, output_dir: str, data_flags: dict, regions_dir: str,
                     pool: str, stream_path: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `accelerate launch` command of one arm (`rc` or `aria`): same teacher, student, data, seeds and steps.

    Always resumable: `--resume_from_checkpoint latest` starts a new run in an empty folder and continues the
    newest complete checkpoint otherwise. `stream_path`: the step stream the cost timing watches.
    """
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r} is not valid; choose one of {', '.join(ARMS)}")
    args = ["--pretrained_model_name_or_path", settings["teacher"], "--output_dir", output_dir,
            "--student_architecture", settings["student_architecture"],
            "--allocation", ARMS[arm], "--seed", str(settings["seed"]),
            "--prompt_pool", pool, "--regions_dir", regions_dir,
            "--caption_column", settings["caption_column"], "--image_column", settings["image_column"],
            "--train_batch_size", str(settings["train_batch_size"]),
            "--gradient_accumulation_steps", str(settings["gradient_accumulation_steps"]),
            "--max_train_steps", str(settings["max_train_steps"]),
            "--checkpointing_steps", str(settings["checkpointing_steps"]), "--checkpoints_total_limit", "2",
            "--learning_rate", str(settings["learning_rate"]), "--mixed_precision", settings["mixed_precision"],
            "--report_to", settings["report_to"], "--resume_from_checkpoint", "latest"]
    if settings.get("resolution"):
        args += ["--resolution", str(settings["resolution"])]
    if settings.get("prompt_pool_column"):
        args += ["--prompt_pool_column", settings["prompt_pool_column"]]
    for flag, key in (("--train_data_dir", "train_data_dir"), ("--dataset_name", "dataset_name")):
        if data_flags.get(key):
            args += [flag, data_flags[key]]
    if stream_path:
        args += ["--write_stream", stream_path]
    args += list(settings.get("extra_train_args", ())) + list(extra)
    return (accelerate_prefix(settings["num_processes"], settings["mixed_precision"], settings.get("cpu"))
            + ["-m", TRAIN_MODULE] + args)


def script_args(cmd: list[str]) -> list[str]:
    """The training script's own arguments in a `training_command`."""
    return cmd[cmd.index(TRAIN_MODULE) + 1:]


def load_train_parser():
    """The training script's `parse_args` (its flags and checks)."""
    from ..training.args import parse_args

    return parse_args


def generation_command(settings: dict, work_dir: str) -> list[str]:
    """The `accelerate launch` command of the sharded generation worker (`diffusers_aria.compare.generate`)."""
    return (accelerate_prefix(settings["num_processes"], "no", settings.get("cpu"))
            + ["-m", "diffusers_aria.compare.generate", work_dir])


__all__ = ["ARMS", "TRAIN_MODULE", "accelerate_prefix", "generation_command", "launch_env", "load_train_parser",
           "script_args", "training_command"]
