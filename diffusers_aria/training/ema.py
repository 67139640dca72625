"""The EMA of the student (diffusers' `EMAModel`), saved inside accelerate checkpoints."""

from __future__ import annotations

import json
import os

EMA_DIR = "unet_ema"


def make_ema(student, decay: float, foreach: bool = False, offload: bool = False):
    """diffusers' `EMAModel` over the student's trainable parameters (`--use_ema`, `--foreach_ema`,
    `--offload_ema`). A full student's EMA knows its model class and config, so checkpoints hold it in
    diffusers' `unet_ema/` layout; with `offload` the shadow weights live on the CPU between updates."""
    from diffusers.training_utils import EMAModel

    params = [p for p in student.parameters() if p.requires_grad]
    full = len(params) == len(list(student.parameters()))
    ema = EMAModel(params, decay=decay, foreach=foreach, model_cls=type(student) if full else None,
                   model_config=student.config if full else None)
    if offload:
        ema.to("cpu")
    return ema


def ema_step(ema, params, device, offload: bool = False) -> None:
    """One EMA update after an optimizer step; with `offload` the shadow weights visit `device` for it and
    go back to the CPU (diffusers' `--offload_ema`)."""
    if offload:
        ema.to(device=device, non_blocking=True)
    ema.step(params)
    if offload:
        ema.to(device="cpu", non_blocking=True)


def register_ema_hooks(accelerator, ema, foreach: bool = False) -> None:
    """Save/load the EMA inside accelerate checkpoints, as diffusers' training scripts do: `unet_ema/` is a
    `UNet2DConditionModel` folder (loadable with `EMAModel.from_pretrained(path, UNet2DConditionModel)`) for a
    full student; for a LoRA student it holds the adapter shadow weights by parameter index
    (`shadow_params.safetensors`) and `ema_config.json`."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        path = os.path.join(output_dir, EMA_DIR)
        if ema.model_cls is not None:
            ema.save_pretrained(path)
            return
        os.makedirs(path, exist_ok=True)
        save_file({f"p{i}": t.detach().contiguous().cpu() for i, t in enumerate(ema.shadow_params)},
                  os.path.join(path, "shadow_params.safetensors"))
        state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        with open(os.path.join(path, "ema_config.json"), "w") as fh:
            json.dump(state, fh, indent=1)

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, EMA_DIR)
        if ema.model_cls is not None:
            from diffusers.training_utils import EMAModel

            loaded = EMAModel.from_pretrained(path, ema.model_cls, foreach=foreach)
            shadow = loaded.shadow_params
            state = {k: v for k, v in loaded.state_dict().items() if k != "shadow_params"}
        else:
            tensors = load_file(os.path.join(path, "shadow_params.safetensors"))
            shadow = [tensors[f"p{i}"] for i in range(len(ema.shadow_params))]
            with open(os.path.join(path, "ema_config.json")) as fh:
                state = json.load(fh)
        for t, src in zip(ema.shadow_params, shadow):
            t.data.copy_(src.to(t.device, t.dtype))
        ema.optimization_step = int(state["optimization_step"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
