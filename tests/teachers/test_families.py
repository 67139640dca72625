"""Model families: detection from model_index.json, conditioning as the pipelines make it, the denoiser calls,
rectified-flow noising, and the teacher/student schedulers of --prediction_type."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffusers_aria.distillation import DistillationLoss
from diffusers_aria.embedded.tiny_families import make_tiny_family_teacher
from diffusers_aria.teachers.families import FlowMatchingNoise, family_name_for, family_of
from diffusers_aria.teachers.parts import TeacherParts, load_teacher
from diffusers_aria.training.outputs import save_student_pipeline
from diffusers_aria.training.preflight import check_teacher_family
from diffusers_aria.training.step import KDStep
from diffusers_aria.training.student import FeatureMappingError, feature_mapping, feature_projections
from diffusers_aria.utils.errors import UserError

NEW_FAMILIES = ("sdxl", "pixart", "sd3")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("family-teachers")
    return {f: make_tiny_family_teacher(str(root / f), f) for f in NEW_FAMILIES}


@pytest.fixture(scope="module")
def loaded(teachers) -> dict[str, TeacherParts]:
    return {f: load_teacher(path) for f, path in teachers.items()}


def test_the_pipeline_class_picks_the_family(teachers, tiny_teacher):
    assert family_of(tiny_teacher).name == "sd"
    for name, path in teachers.items():
        assert family_of(path).name == name
    with pytest.raises(ValueError, match=r"KandinskyPipeline.*supported pipelines: StableDiffusionPipeline"):
        family_name_for("KandinskyPipeline")


def test_preflight_refuses_a_student_that_does_not_fit_the_teacher(teachers, tmp_path):
    check_teacher_family(teachers["pixart"], "dit_first_last")
    with pytest.raises(UserError, match=r"'koala_1b' does not fit a pixart teacher.*dit_every_other"):
        check_teacher_family(teachers["pixart"], "koala_1b")
    with pytest.raises(UserError, match=r"'dit_every_other' does not fit a sdxl teacher"):
        check_teacher_family(teachers["sdxl"], "dit_every_other")
    with pytest.raises(UserError, match="--student_num_blocks applies to transformer students"):
        check_teacher_family(teachers["sdxl"], None, num_blocks=2)
    with pytest.raises(UserError, match="--student_keep_blocks applies to transformer students.*'koala_1b'"):
        check_teacher_family(teachers["sdxl"], "koala_1b", keep_blocks=[0, 1])
    with pytest.raises(UserError, match="--feature_kd_taps 'all' applies to UNet students"):
        check_teacher_family(teachers["sd3"], None, taps="all")
    with pytest.raises(UserError, match="--student_num_blocks 2 does not apply to dit_every_other"):
        check_teacher_family(teachers["pixart"], None, num_blocks=2)
    check_teacher_family(teachers["pixart"], "dit_first_last", num_blocks=2)
    check_teacher_family(teachers["sd3"], None, keep_blocks=[0, 3])
    check_teacher_family(teachers["sdxl"], "koala_1b", taps="all")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="FluxPipeline, which diffusers-aria cannot distil"):
        check_teacher_family(str(other), None)


def test_teacher_parts_hold_every_part_of_the_pipeline(loaded):
    sdxl, pixart, sd3 = loaded["sdxl"], loaded["pixart"], loaded["sd3"]
    assert {"text_encoder_2", "tokenizer_2", "scheduler"} <= set(sdxl.extra)
    assert type(sdxl.scheduler).__name__ == "DDPMScheduler"  # training noise; sampling keeps Euler
    assert type(sdxl.pipeline_components()["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert type(pixart.denoiser).__name__ == "PixArtTransformer2DModel"
    assert isinstance(sd3.scheduler, FlowMatchingNoise) and sd3.scheduler.config.shift == 3.0
    assert {"text_encoder_3", "tokenizer_3"} <= set(sd3.extra)


def test_sdxl_conditioning_has_pooled_embeddings_and_time_ids_per_prompt(loaded):
    parts = loaded["sdxl"]
    cond = parts.encode(["a red cube", "a blue sphere", "a red cube"], "cpu", resolution=32)
    pipe = parts.make_pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(["a blue sphere"], device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(cond["encoder_hidden_states"][1:2], embeds, atol=1e-5)  # batched vs alone
    assert torch.allclose(cond["text_embeds"][1:2], pooled, atol=1e-5)
    assert cond["encoder_hidden_states"].shape[-1] == parts.denoiser.config.cross_attention_dim
    assert not torch.equal(cond["text_embeds"][0], cond["text_embeds"][1])  # a swapped prompt: its own pooled
    assert torch.equal(cond["text_embeds"][0], cond["text_embeds"][2])
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 3
    given = torch.tensor([[40.0, 48.0, 0.0, 5.0, 32.0, 32.0]] * 3)  # paired images' own (ImageCaptionDataset)
    assert torch.equal(parts.encode(["a", "b", "c"], "cpu", 32, time_ids=given)["time_ids"], given)


def test_pixart_and_sd3_conditioning(loaded):
    cond = loaded["pixart"].encode(["a red cube", "a much longer prompt about a blue sphere"], "cpu", 32)
    assert cond["encoder_attention_mask"].shape == cond["encoder_hidden_states"].shape[:2]
    assert cond["encoder_attention_mask"].sum(1)[0] < cond["encoder_attention_mask"].sum(1)[1]
    cond = loaded["sd3"].encode(["a red cube", "a blue sphere"], "cpu", 32)
    cfg = loaded["sd3"].denoiser.config
    assert cond["encoder_hidden_states"].shape[-1] == cfg.joint_attention_dim
    assert cond["pooled_projections"].shape == (2, cfg.pooled_projection_dim)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_a_student_equal_to_its_teacher_has_zero_output_kd(loaded, family):
    """Both denoisers get the same conditioning through the family's call: a copy of the teacher matches it."""
    parts = loaded[family]
    student = copy.deepcopy(parts.denoiser)
    latents = torch.randn(2, parts.denoiser.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    cond = parts.encode(["a red cube", "a blue sphere"], "cpu", 32)
    kd = KDStep(parts.denoiser, student, parts.scheduler, DistillationLoss(1.0, 0.0, 0.0), family=parts.family)
    terms = kd(student, latents, noise, torch.tensor([10, 900]), cond)
    assert terms.output.shape == (2,) and torch.all(terms.output == 0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert torch.all(kd(student, latents, noise, torch.tensor([10, 900]), cond).output > 0)


def test_pixart_prediction_keeps_the_noise_half_of_a_learned_sigma_output(loaded):
    parts = loaded["pixart"]
    assert parts.denoiser.config.out_channels == 2 * parts.denoiser.config.in_channels
    cond = parts.encode(["a red cube"], "cpu", 32)
    x = torch.randn(1, parts.denoiser.config.in_channels, 16, 16)
    full = parts.denoiser(x, encoder_hidden_states=cond["encoder_hidden_states"],
                      encoder_attention_mask=cond["encoder_attention_mask"], timestep=torch.tensor([5]),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert torch.equal(parts.family.predict(parts.denoiser, x, torch.tensor([5]), cond), full[:, :4])


def test_flow_matching_noise_follows_the_sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_aria.distillation import prediction_target

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = FlowMatchingNoise.from_scheduler(sched)
    t = torch.arange(1000)
    assert torch.allclose(flow.sigmas(t), sched.sigmas.flip(0))  # the scheduler's training sigmas, ascending
    assert torch.allclose(flow.model_timesteps(t), sched.timesteps.flip(0))
    x0, n = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    ts = torch.tensor([0, 500, 999])
    sigma = flow.sigmas(ts).reshape(-1, 1, 1, 1)
    assert torch.allclose(flow.add_noise(x0, n, ts), (1 - sigma) * x0 + sigma * n)
    assert torch.equal(prediction_target(flow, x0, n, ts), n - x0)  # the velocity
    with pytest.raises(ValueError, match="'v_prediction'.*velocity"):
        flow.register_to_config(prediction_type="v_prediction")
    # the clean latent's share of x_t's variance (what --aria_feed congruent reads), from 1 down to 0
    share = flow.alphas_cumprod
    assert share.shape == (1000,) and float(share[0]) > 0.99 and float(share[-1]) < 1e-3
    assert bool((share[1:] <= share[:-1]).all())
    x0, n = torch.randn(200_000), torch.randn(200_000)
    t = torch.full((200_000,), 400)
    xt = flow.add_noise(x0, n, t)
    assert float((((1 - flow.sigmas(t)) * x0) ** 2).mean() / (xt ** 2).mean()) == pytest.approx(
        float(share[400]), rel=0.02)


def test_prediction_type_leaves_the_teachers_sampling_scheduler_alone(tiny_teacher):
    """--prediction_type: training and the student's pipelines use the new type; the teacher's pipelines
    (teacher latents, the teacher row of validation) keep sampling in the teacher's."""
    parts = load_teacher(tiny_teacher)
    before = parts.scheduler.config.prediction_type
    train = parts.training_scheduler("v_prediction")
    assert train.config.prediction_type == "v_prediction" and parts.scheduler.config.prediction_type == before
    assert parts.pipeline_components()["scheduler"].config.prediction_type == before
    assert parts.student_scheduler().config.prediction_type == "v_prediction"
    assert parts.make_pipeline().scheduler.config.prediction_type == before


def test_feature_kd_taps_choose_stage_or_self_attention_pairs(loaded):
    from diffusers_aria.teachers.families import FAMILIES

    parts = loaded["sdxl"]
    student, _ = parts.family.build_student(parts.denoiser, "koala_700m")
    auto = feature_mapping(parts.denoiser, student, "koala_700m", FAMILIES["sdxl"])
    stages = feature_mapping(parts.denoiser, student, "koala_700m", FAMILIES["sdxl"], taps="stages")
    both = feature_mapping(parts.denoiser, student, "koala_700m", FAMILIES["sdxl"], taps="all")
    assert auto and all(t.endswith(".attn1") and s.endswith(".attn1") for t, s in auto.items())  # KOALA's choice
    assert stages and not any(t.endswith(".attn1") for t in stages)
    assert both == {**stages, **auto}
    # the student's kept blocks are the teacher's first ones: block j of a stage is paired with teacher block j
    assert "up_blocks.0.attentions.0.transformer_blocks.1.attn1" in auto.values()
    bk = feature_mapping(parts.denoiser, parts.family.build_student(parts.denoiser, "bk_small")[0], "bk_small",
                                   FAMILIES["sdxl"])
    assert bk and not any(t.endswith(".attn1") for t in bk)
    pix = loaded["pixart"]
    dit, _ = pix.family.build_student(pix.denoiser, "dit_every_other")
    assert feature_mapping(pix.denoiser, dit, "dit_every_other", FAMILIES["pixart"]) == {
        "transformer_blocks.1": "transformer_blocks.0", "transformer_blocks.3": "transformer_blocks.1"}
    with pytest.raises(FeatureMappingError, match="applies to UNet students"):
        feature_mapping(pix.denoiser, dit, "dit_every_other", FAMILIES["pixart"], taps="stages")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_evaluate_compares_a_student_of_any_family(teachers, loaded, family, tmp_path):
    """`diffusers-aria evaluate`'s measurement: zero for the teacher against itself, positive for a student."""
    from diffusers_aria.training.evaluation import evaluate_student

    prompts = ["a red cube", "a blue sphere", "a green cone"]
    same = evaluate_student(teachers[family], teachers[family], prompts, timesteps=(100, 700))
    assert same["overall"] == 0.0
    parts = loaded[family]
    student, _ = parts.family.build_student(parts.denoiser, parts.family.students[-1])
    save_student_pipeline(str(tmp_path), student, parts)
    other = evaluate_student(teachers[family], str(tmp_path), prompts, region_ids=[0, 1, 1], timesteps=(100, 700))
    assert other["overall"] > 0 and set(other["per_region"]) == {"0", "1"}


def test_a_pixart_sigma_teacher_is_a_pixart_teacher(loaded, tmp_path):
    from diffusers import PixArtSigmaPipeline

    alpha = loaded["pixart"]
    PixArtSigmaPipeline(transformer=alpha.denoiser, **alpha.pipeline_components()).save_pretrained(tmp_path)
    parts = load_teacher(str(tmp_path))
    assert parts.family.name == "pixart" and parts.pipeline_class == "PixArtSigmaPipeline"
    cond = parts.encode(["a red cube"], "cpu", 32)
    assert cond["encoder_hidden_states"].shape[-1] == parts.denoiser.config.caption_channels
    assert type(parts.make_pipeline()).__name__ == "PixArtSigmaPipeline"


def test_native_resolution_is_what_the_pipeline_generates_by_default(loaded, tiny_teacher):
    for parts in (*loaded.values(), load_teacher(tiny_teacher)):
        pipe = parts.make_pipeline()
        sample = getattr(pipe, "default_sample_size", None) or parts.denoiser.config.sample_size
        assert parts.native_resolution() == sample * pipe.vae_scale_factor


def test_a_narrower_sdxl_student_gets_feature_projections(loaded):
    """--student_width_scale on an SDXL teacher: the pair widths come from a forward pass with the family's
    conditioning, and the projections make feature KD run."""
    from diffusers_aria.distillation import DistillationLoss

    parts = loaded["sdxl"]
    student, _ = parts.family.build_student(parts.denoiser, "bk_small", width_scale=0.5)
    mapping = feature_mapping(parts.denoiser, student, "bk_small", parts.family)
    with torch.no_grad():
        projections = feature_projections(parts.denoiser, student, mapping, family=parts.family,
                                                    cond=parts.encode([""], "cpu", 32))
    assert projections is not None and any(projections.has_projection(name) for name in mapping)
    kd = KDStep(parts.denoiser, student, parts.scheduler, DistillationLoss(1.0, 1.0, 0.0), feature_mapping=mapping,
                projections=projections, family=parts.family)
    latents = torch.randn(2, 4, 16, 16)
    terms = kd(student, latents, torch.randn_like(latents), torch.tensor([10, 500]),
               parts.encode(["a", "b"], "cpu", 32))
    assert torch.isfinite(terms.feature).all() and (terms.feature > 0).all()
    pix = loaded["pixart"]
    dit, _ = pix.family.build_student(pix.denoiser, "dit_every_other")
    dit_pairs = feature_mapping(pix.denoiser, dit, "dit_every_other", pix.family)
    with torch.no_grad():  # a block-subset student keeps the teacher's widths: nothing to project
        assert feature_projections(pix.denoiser, dit, dit_pairs, family=pix.family,
                                             cond=pix.encode([""], "cpu", 32)) is None
