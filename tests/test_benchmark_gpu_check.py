"""scripts/gpu_check.sh --smoke: the GPU check's code (SD-1.5-shaped teacher from configs, bk_small student, bf16
autocast, interleaved ARIA and RC steps) run on CPU at 64 px, as CI runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _gpu_check_in_process(argv: list[str], capsys) -> str:
    """benchmarks/gpu_check.py's main() in this process (one process, as the script runs on CPU); its output."""
    import sys

    from launching import one_process_run

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    capsys.readouterr()
    with one_process_run():
        gpu_check.main(gpu_check.parse_args(argv))
    return capsys.readouterr().out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gpu_check_smoke(tmp_path, lora, capsys):
    """The full student through the script as CI runs it; the LoRA student by its main() in this process."""
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out_dir", str(tmp_path)]
    if lora:
        stdout = _gpu_check_in_process(cmd[2:] + ["--lora"], capsys)
    else:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        stdout = res.stdout
    rec = json.loads((tmp_path / ("gpu_check_smoke" + ("_lora" if lora else "") + ".json")).read_text())
    assert rec["mixed_precision"] == "bf16" and rec["resolution"] == 64 and rec["num_processes"] == 1
    assert rec["feature_pairs"] > 0 and rec["step_ms"]["aria"]["n"] == rec["step_ms"]["rc"]["n"] == 3
    assert 0.2 < rec["ratio_aria_rc"] < 5 and rec["samples_per_s"]["aria"] > 0
    if lora:
        assert rec["student_trainable_params"] < rec["student_params"] / 5
    else:
        assert rec["student_trainable_params"] == rec["student_params"]
    assert "ARIA/RC step time" in stdout
    assert rec["finite_loss"] is True and rec["nonfinite_loss_steps"] == {"aria": 0, "rc": 0}


@pytest.mark.parametrize("family,lora", [("pixart", True)])
def test_gpu_check_smoke_other_families(tmp_path, family, lora, capsys):
    """`--family`: the same measurement on a tiny PixArt teacher with a LoRA student (the real sizes on a GPU), by
    the script's main() in this process. One family runs here: the SDXL and SD3 students train, resume and
    generate in tests/training/test_train_families.py, and their real-size parts fit together in
    test_real_size_parts_fit_together."""
    _gpu_check_in_process(["--smoke", "--family", family, "--out_dir", str(tmp_path)] + (["--lora"] if lora else []),
                          capsys)
    rec = json.loads((tmp_path / f"gpu_check_{family}_smoke{'_lora' if lora else ''}.json").read_text())
    assert rec["family"] == family and rec["student"].startswith("koala_700m" if family == "sdxl" else "dit_every_other")
    assert rec["feature_pairs"] > 0 and rec["step_ms"]["aria"]["n"] == 3 and rec["samples_per_s"]["rc"] > 0
    assert rec["student_params"] < rec["teacher_params"] < rec["frozen_params"]
    assert (rec["student_trainable_params"] < rec["student_params"]) == lora
    assert rec["finite_loss"] is True  # the script's exit status on the command line


@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3"])
def test_real_size_parts_fit_together(family, monkeypatch):
    """The real-size parts of `--family` (built on the meta device here: no memory, no GPU) are the published
    sizes and their widths match: text states -> cross-attention / caption / joint widths, pooled -> added
    embeddings."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("gpu_check", None)
    import gpu_check

    parts = gpu_check._real_components(family, 1024, "meta")
    denoiser = parts["unet" if family == "sdxl" else "transformer"]
    billions = sum(p.numel() for p in denoiser.parameters()) / 1e9
    assert billions == pytest.approx({"sdxl": 2.57, "pixart": 0.61, "sd3": 2.03}[family], rel=0.02)
    cfg = denoiser.config
    if family == "sdxl":
        te, te2 = parts["text_encoder"].config, parts["text_encoder_2"].config
        assert cfg.cross_attention_dim == te.hidden_size + te2.hidden_size
        assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + te2.projection_dim
    elif family == "pixart":
        assert cfg.caption_channels == parts["text_encoder"].config.d_model == 4096
    else:
        assert cfg.joint_attention_dim == parts["text_encoder_3"].config.d_model
        assert cfg.pooled_projection_dim == (parts["text_encoder"].config.projection_dim
                                             + parts["text_encoder_2"].config.projection_dim)
        assert parts["vae"].config.latent_channels == cfg.in_channels == 16


def test_a_smoke_run_writes_outside_the_tracked_results():
    """Without --out_dir a smoke run writes into outputs/benchmarks (git-ignored), never benchmarks/results."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    out = Path(gpu_check.parse_args(["--smoke"]).out_dir)
    assert out == Path(gpu_check.SMOKE_OUT_DIR) and (ROOT / "benchmarks" / "results") not in out.parents
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "gpu_check_smoke.json")], cwd=ROOT)
    assert ignored.returncode == 0
    assert gpu_check.parse_args([]).out_dir is None  # a real run: benchmarks/results
