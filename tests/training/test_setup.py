"""run_setup: the student beside a teacher in another dtype, feature pairs that fail loudly, rank agreement."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from diffusers_aria.regions import ConditionRegions
from diffusers_aria.teachers.parts import load_teacher
from diffusers_aria.training.ema import EMA_DIR, ema_step, make_ema, register_ema_hooks
from diffusers_aria.training.inputs import (
    RankMismatchError,
    agreement_error,
    check_ranks_agree,
    run_fingerprint,
)
from diffusers_aria.training.outputs import save_student_pipeline
from diffusers_aria.training.student import (
    FeatureMappingError,
    enable_xformers,
    feature_mapping,
    make_optimizer,
    make_student,
    student_init_unet,
)

POOL = [f"prompt number {i}" for i in range(12)]


def _regions(ids) -> ConditionRegions:
    return ConditionRegions(region_ids=np.asarray(ids, dtype=np.int32), centroids=np.eye(3, dtype=np.float32))


@pytest.fixture(scope="module")
def teacher_parts(tiny_teacher):
    return load_teacher(tiny_teacher)


def test_student_is_float32_and_the_teacher_keeps_its_dtype(teacher_parts):
    teacher = teacher_parts.denoiser.to(torch.bfloat16)
    try:
        student, _ = make_student(teacher, "bk_small")
        assert {p.dtype for p in student.parameters()} == {torch.float32}
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # not upcast in place
    finally:
        teacher.to(torch.float32)


def test_frozen_parts_share_one_dtype_and_the_saved_pipeline_is_float32(tiny_teacher, tmp_path):
    parts = load_teacher(tiny_teacher)
    student, _ = make_student(parts.denoiser, "bk_tiny")
    parts.to_weight_dtype("cpu", torch.bfloat16)
    for m in (parts.denoiser, parts.vae, parts.text_encoder):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in m.parameters())
    save_student_pipeline(str(tmp_path), student, parts)
    from safetensors.torch import load_file

    for sub in ("unet", "vae", "text_encoder"):
        files = [f for f in os.listdir(tmp_path / sub) if f.endswith(".safetensors")]
        assert files, sub
        for f in files:
            assert {t.dtype for t in load_file(tmp_path / sub / f).values()} == {torch.float32}, sub


def test_feature_kd_without_feature_pairs_fails_loudly(teacher_parts):
    student, _ = make_student(teacher_parts.denoiser, "bk_tiny")
    assert feature_mapping(teacher_parts.denoiser, student, "bk_tiny")  # the real pairs exist
    from diffusers import UNet2DConditionModel

    cfg = teacher_parts.denoiser.config
    other = UNet2DConditionModel(  # e.g. a --student_model_name_or_path of another structure: more stages
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=(8, 8, 8),
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=cfg.cross_attention_dim)
    with pytest.raises(FeatureMappingError, match="--lambda_kd_feat 0"):
        feature_mapping(teacher_parts.denoiser, other, "bk_small")


def test_agreement_error_names_what_differs():
    a = run_fingerprint(POOL, _regions([0, 1, 2] * 4), seed=0)
    assert agreement_error([a, dict(a)]) is None
    other_seed = run_fingerprint(POOL, _regions([0, 1, 2] * 4), seed=1)
    message = agreement_error([a, other_seed])
    assert "seed" in message and "rank 0: 0" in message and "rank 1: 1" in message
    other_regions = run_fingerprint(POOL, _regions([0, 1, 2] * 3 + [2, 1, 0]), seed=0)
    assert "regions" in agreement_error([a, other_regions])
    other_pool = run_fingerprint(POOL[:-1] + ["another"], _regions([0, 1, 2] * 4), seed=0)
    assert "pool" in agreement_error([a, other_pool])


def _agreement_worker(out_dir: str) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    rank = acc.process_index
    check_ranks_agree(acc, POOL, _regions([0, 1, 2] * 4), seed=0)  # the same everywhere: passes
    try:
        check_ranks_agree(acc, POOL, _regions([0, 1, 2] * 4), seed=rank)  # each rank its own seed
        outcome = "passed"
    except RankMismatchError as e:
        outcome = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"world": acc.num_processes, "outcome": outcome}, fh)


def test_two_processes_with_different_seeds_stop_with_a_clear_error(tmp_path, debug_launch):
    debug_launch(_agreement_worker, args=(str(tmp_path),), num_processes=2)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    for r in results:
        assert "disagree on the seed" in r["outcome"] and "rank 1: 1" in r["outcome"]


def _tiny_student(teacher_parts):
    student, _ = make_student(teacher_parts.denoiser, "bk_tiny")
    return student


def test_ema_in_diffusers_unet_ema_layout_with_foreach_and_offload(teacher_parts, tmp_path):
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    student = _tiny_student(teacher_parts)
    ema = make_ema(student, 0.5, foreach=True, offload=True)
    assert ema.foreach and ema.model_cls is UNet2DConditionModel
    acc = Accelerator(cpu=True)
    register_ema_hooks(acc, ema, foreach=True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_step(ema, list(student.parameters()), "cpu", offload=True)
    acc.save_state(str(tmp_path / "ckpt"))
    folder = tmp_path / "ckpt" / EMA_DIR
    saved = UNet2DConditionModel.from_pretrained(str(folder))  # a plain diffusers UNet folder
    loaded = EMAModel.from_pretrained(str(folder), UNet2DConditionModel)
    assert loaded.optimization_step == 1
    for a, b in zip(saved.parameters(), ema.shadow_params):
        torch.testing.assert_close(a, b)
    before = [t.clone() for t in ema.shadow_params]
    ema_step(ema, list(student.parameters()), "cpu", offload=True)
    acc.load_state(str(tmp_path / "ckpt"))
    assert ema.optimization_step == 1
    for a, b in zip(before, ema.shadow_params):
        torch.testing.assert_close(a, b)


def test_offload_ema_moves_the_shadow_weights_for_the_update_only():
    calls = []

    class SpyEMA:
        def to(self, device=None, non_blocking=False):
            calls.append(str(device))

        def step(self, params):
            calls.append("step")

    ema_step(SpyEMA(), [], "cuda:1", offload=True)
    assert calls == ["cuda:1", "step", "cpu"]
    calls.clear()
    ema_step(SpyEMA(), [], "cuda:1", offload=False)
    assert calls == ["step"]


def test_8bit_adam_uses_bitsandbytes_or_says_how_to_get_it(monkeypatch):
    import sys
    import types

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(params, 1e-3, (0.9, 0.99), 0.01, 1e-8)) is torch.optim.AdamW
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match="--use_8bit_adam needs bitsandbytes"):
        make_optimizer(params, 1e-3, (0.9, 0.99), 0.01, 1e-8, use_8bit_adam=True)

    class AdamW8bit(torch.optim.AdamW):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    opt = make_optimizer(params, 1e-3, (0.8, 0.9), 0.0, 1e-7, use_8bit_adam=True)
    assert type(opt) is AdamW8bit and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-7


def test_xformers_flag_without_xformers_is_a_clear_error(monkeypatch):
    import diffusers.utils

    monkeypatch.setattr(diffusers.utils, "is_xformers_available", lambda: False)
    with pytest.raises(ValueError, match="xformers is not installed"):
        enable_xformers()
    enabled = []

    class SpyUNet:
        def enable_xformers_memory_efficient_attention(self):
            enabled.append(self)

    monkeypatch.setattr(diffusers.utils, "is_xformers_available", lambda: True)
    enable_xformers(SpyUNet(), SpyUNet())
    assert len(enabled) == 2


def test_non_ema_revision_builds_the_student_from_that_revision(teacher_parts, monkeypatch):
    from diffusers import UNet2DConditionModel

    assert student_init_unet(teacher_parts, None) is teacher_parts.denoiser
    assert student_init_unet(teacher_parts, teacher_parts.revision) is teacher_parts.denoiser
    seen = {}

    def spy(name, **kw):
        seen.update(kw, name=name)
        return "the non-ema unet"

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", spy)
    assert student_init_unet(teacher_parts, "non-ema") == "the non-ema unet"
    assert seen == {"name": teacher_parts.name_or_path, "subfolder": "unet", "revision": "non-ema"}
