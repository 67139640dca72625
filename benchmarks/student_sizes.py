"""Parameter counts of every student preset on the real public teacher configs, against published sizes.

Models are built on PyTorch's meta device from `diffusers_aria.distillation.reference_configs` (nothing is
downloaded, no weights are allocated): SD-1.5 and SDXL-base UNets with the BK-SDM presets, SDXL with the
KOALA presets, PixArt-alpha / PixArt-Sigma XL-2-1024 and SD3-medium transformers with the DiT presets.
Published sizes: BK-SDM (Kim et al.), KOALA (Lee et al.), the PixArt and SD3 papers / model cards.

    python benchmarks/student_sizes.py        # seconds
Writes benchmarks/results/student_sizes.json and prints a Markdown table (docs/student-sizes.md).
"""

from __future__ import annotations

import sys
import time

from _common import header, offline_env, table, write_json

offline_env()

from diffusers_aria.distillation import (  # noqa: E402
    DIT_STUDENT_ARCHITECTURES,
    STUDENT_ARCHITECTURES,
    dit_block_indices,
    dit_student_config,
    student_config,
)
from diffusers_aria.distillation.reference_configs import REFERENCE_MODELS, count_parameters  # noqa: E402

# Published student sizes, billions of parameters (teachers' are in REFERENCE_MODELS).
PUBLISHED = {
    ("sd15_unet", "bk_base"): 0.58,
    ("sd15_unet", "bk_small"): 0.49,
    ("sd15_unet", "bk_tiny"): 0.33,
    ("sdxl_base_unet", "koala_1b"): 1.16,
    ("sdxl_base_unet", "koala_700m"): 0.78,
}
UNET_PRESETS = {
    "sd15_unet": STUDENT_ARCHITECTURES,
    "sdxl_base_unet": STUDENT_ARCHITECTURES + ("koala_1b", "koala_700m"),
}
DIT_TEACHERS = ("pixart_alpha_xl_1024", "pixart_sigma_xl_1024", "sd3_medium")


def _unet_layout(config: dict) -> str:
    depths = config.get("transformer_layers_per_block", 1)
    mid = "mid" if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") else "no mid"
    return (
        f"{len(config['down_block_types'])} stages, {config['layers_per_block']} layer(s)/down stage, "
        f"depth {list(depths) if isinstance(depths, (list, tuple)) else depths}, {mid}"
    )


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 9] -> '0-2, 5, 7, 9' (runs of 3+ consecutive blocks collapsed)."""
    out, start = [], 0
    for k in range(1, len(indices) + 1):
        if k == len(indices) or indices[k] != indices[k - 1] + 1:
            run = indices[start:k]
            out += [f"{run[0]}-{run[-1]}"] if len(run) > 2 else [str(i) for i in run]
            start = k
    return ", ".join(out)


def rows() -> list[dict]:
    results = []

    def add(model: str, preset: str, model_class: type, config: dict, layout: str) -> None:
        params = count_parameters(model_class, config)
        published = REFERENCE_MODELS[model][2] if preset == "teacher" else PUBLISHED.get((model, preset))
        deviation = None if published is None else 100.0 * (params / 1e9 - published) / published
        results.append({"model": model, "preset": preset, "params": params, "params_b": params / 1e9,
                        "published_b": published, "deviation_pct": deviation, "layout": layout})

    for model, presets in UNET_PRESETS.items():
        model_class, config, _ = REFERENCE_MODELS[model]
        add(model, "teacher", model_class, config, _unet_layout(config))
        for preset in presets:
            student = student_config(config, preset)
            add(model, preset, model_class, student, _unet_layout(student))
    for model in DIT_TEACHERS:
        model_class, config, _ = REFERENCE_MODELS[model]
        n = config["num_layers"]
        add(model, "teacher", model_class, config, f"blocks 0-{n - 1} ({n})")
        for preset in DIT_STUDENT_ARCHITECTURES:
            keep = dit_block_indices(n, preset)
            add(model, preset, model_class, dit_student_config(config, keep), f"blocks {_ranges(keep)} ({len(keep)})")
    return results


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=None, help="where the JSON goes (default benchmarks/results)")
    out_dir = parser.parse_args(argv).out_dir
    info = header(argv, "student_sizes.py")
    start = time.perf_counter()
    results = rows()
    info["seconds"] = round(time.perf_counter() - start, 2)

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(table(
        [[r["model"], r["preset"], f"{r['params']:,}", f"{r['params_b']:.3f}", fmt(r["published_b"], ".2f"),
          fmt(r["deviation_pct"], "+.1f"), r["layout"]] for r in results],
        ["model", "preset", "params", "params (B)", "published (B)", "deviation %", "kept"],
    ))
    path = write_json("student_sizes", {**info, "rows": results}, out_dir=out_dir)
    print(f"\nwrote {path} ({info['seconds']} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
