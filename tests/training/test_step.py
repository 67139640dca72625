"""training.py: prompt encoding as the pipeline does it, step noise, the KD step, ARIA assembly."""

import numpy as np
import pytest
import torch

from diffusers_aria.settings import AriaSettings
from diffusers_aria.teachers.families import encode_prompts
from diffusers_aria.training.aria import build_aria, region_names_from_groups
from diffusers_aria.training.step import KDStep, sample_noise_and_timesteps


def test_encode_prompts_matches_the_pipeline(tiny_teacher):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)
    prompts = ["a red fox", "a bowl of ramen with chopsticks and an egg"]
    ours = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, batch_size=1), ours)


def test_noise_and_timesteps_are_a_function_of_the_step():
    x = torch.zeros(3, 4, 2, 2)
    n1, t1 = sample_noise_and_timesteps(x, 1000, seed=0, step=5, rank=0)
    n2, t2 = sample_noise_and_timesteps(x, 1000, seed=0, step=5, rank=0)
    assert torch.equal(n1, n2) and torch.equal(t1, t2)
    n3, _ = sample_noise_and_timesteps(x, 1000, seed=0, step=5, rank=1)
    assert not torch.equal(n1, n3) and int(t1.max()) < 1000


def test_kd_step_gives_per_sample_losses_zero_for_a_copy(tiny_teacher):
    import copy

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffusers_aria.distillation import DistillationLoss

    teacher = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(tiny_teacher, subfolder="scheduler")
    student = copy.deepcopy(teacher)
    mapping = {"down_blocks.0": "down_blocks.0", "up_blocks.1": "up_blocks.1"}
    kd = KDStep(teacher, student, sched, DistillationLoss(1.0, 1.0, 0.0), feature_mapping=mapping)
    x = torch.randn(3, 4, 16, 16)
    h = torch.randn(3, 8, 384)
    terms = kd(student, x, torch.randn_like(x), torch.tensor([10, 500, 900]), h)
    assert terms.total.shape == (3,) and torch.allclose(terms.total, torch.zeros(3), atol=1e-10)
    with torch.no_grad():
        next(student.parameters()).add_(0.1)
    terms = kd(student, x, torch.randn_like(x), torch.tensor([10, 500, 900]), h)
    assert (terms.output > 0).all() and (terms.feature > 0).all() and terms.total.requires_grad


def test_build_aria_wires_settings_into_components():
    from diffusers_aria.regions import ConditionRegions

    regions = ConditionRegions(np.array([0, 0, 1, 2, 2, 2], dtype=np.int32), np.eye(3, dtype=np.float32))
    pool = [f"p{i}" for i in range(6)]
    s = AriaSettings(allocation="exp3", exp3_gamma=0.3, half_life=7, num_timestep_bins=3, rc_schedule="sigmoid",
                     null_prompt_prob=0.2, prior_strength=1.5)
    c = build_aria(s, regions, pool, num_train_timesteps=500)
    assert c.policy.name == "exp3" and c.policy.gamma == 0.3
    assert c.tracker.half_life == 7 and c.tracker.num_timestep_bins == 3 and c.tracker.prior_strength == 1.5
    assert c.conditioning.schedule.kind == "sigmoid" and c.conditioning.null_prompt_prob == 0.2
    assert c.conditioning.schedule.num_train_timesteps == 500
    with pytest.raises(ValueError, match="--allocation 'x' is not valid"):
        AriaSettings(allocation="x")


@pytest.mark.parametrize("feed, fed", [("all", [0, 1, 2, 3]), ("swapped", [0, 1]), ("congruent", [1, 2, 3])])
def test_the_feed_picks_the_samples_the_tracker_sees(feed, fed):
    from diffusers_aria.conditioning import ConditioningBatch
    from diffusers_aria.embedded.tiny_teacher import tiny_scheduler
    from diffusers_aria.regions import ConditionRegions

    regions = ConditionRegions(np.array([0, 1, 2, 3], dtype=np.int32), np.eye(4, dtype=np.float32))
    ab = tiny_scheduler().alphas_cumprod
    c = build_aria(AriaSettings(feed=feed), regions, [f"p{i}" for i in range(4)], alphas_cumprod=ab)
    # sample i is in region i: two swaps (t = 50: the image dominates; t = 900: noise does), two paired samples
    cond = ConditioningBatch(prompts=["a", "b", "c", "d"], swapped=torch.tensor([True, True, False, False]),
                             region_ids=torch.tensor([0, 1, 2, 3]), pool_indices=torch.tensor([0, 1, -1, -1]))
    c.accumulate(cond, torch.ones(4), torch.tensor([50, 900, 50, 900]))
    c.callback.on_step_end(0)
    # the first samples of a timestep bin only start its baseline: the fed samples show in the bins' counts
    assert sorted(np.nonzero(c.tracker.b0)[0].tolist()) == sorted({[0, 9, 0, 9][i] for i in fed})
    assert c.tracker.b0.sum() == pytest.approx(len(fed))
    if feed == "congruent":
        with pytest.raises(ValueError, match="needs the noise scheduler's alphas_cumprod"):
            build_aria(AriaSettings(feed=feed), regions, [f"p{i}" for i in range(4)])


def test_region_names_from_groups():
    names = region_names_from_groups(np.array([0, 0, 1]), ["cats", "cats", "food"])
    assert names == ["cats (100%)", "food (100%)"]
    assert region_names_from_groups(np.array([0]), None) is None


def test_settings_build_the_tracker_and_policy_and_name_settings_the_policy_ignores(caplog):
    from diffusers_aria.allocation import DoReMiEG
    from diffusers_aria.settings import AriaSettings

    s = AriaSettings(tau=0.3, max_ratio=None, samples_per_half_life=None, half_life=20.0)
    policy = s.make_policy(np.array([5, 10, 20]))
    assert (policy.tau, policy.max_ratio, policy.score) == (0.3, None, "sparse")
    tracker = s.make_tracker(3, num_train_timesteps=500)
    assert (tracker.half_life, tracker.samples_per_half_life, tracker.num_train_timesteps) == (20.0, None, 500)
    assert isinstance(AriaSettings(allocation="doremi", doremi_lr=0.2).make_policy([1, 2]), DoReMiEG)
    with caplog.at_level("WARNING", logger="diffusers_aria.training"):
        assert isinstance(AriaSettings(allocation="doremi", tau=0.3).make_policy([1, 2]), DoReMiEG)
        AriaSettings(allocation="rc", alpha=0.5, exp3_gamma=0.5).make_policy([1, 2])
        AriaSettings(allocation="rc").make_policy([1, 2])  # nothing changed from the defaults: no warning
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("--allocation doremi does not use --aria_tau (set away from the default)")
    assert messages[1].startswith("--allocation rc does not use --aria_alpha, --exp3_gamma")
    assert len(messages) == 2


def test_step_noise_offset_and_input_perturbation():
    from diffusers_aria.training.step import sample_step_noise

    x = torch.zeros(4, 4, 8, 8)
    base, t = sample_noise_and_timesteps(x, 1000, seed=0, step=3, rank=0)
    plain = sample_step_noise(x, 1000, seed=0, step=3, rank=0)
    assert torch.equal(plain.noise, base) and plain.input_noise is plain.noise and torch.equal(plain.timesteps, t)
    off = sample_step_noise(x, 1000, seed=0, step=3, rank=0, noise_offset=0.1)
    shift = off.noise - base  # constant over H, W, different per sample and channel
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6) and shift.abs().max() > 0
    assert torch.equal(off.timesteps, t)
    pert = sample_step_noise(x, 1000, seed=0, step=3, rank=0, input_perturbation=0.1)
    assert torch.equal(pert.noise, base)  # the target's noise is unchanged ...
    extra = pert.input_noise - base  # ... x_t gets 0.1 * N(0, 1) more
    assert 0.05 < float(extra.std()) < 0.15


def _kd_pair(tiny_teacher):
    import copy

    from diffusers import DDPMScheduler, UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(tiny_teacher, subfolder="scheduler")
    return teacher, copy.deepcopy(teacher), sched


def test_kd_step_input_noise_snr_gamma_and_prediction_type(tiny_teacher):
    from diffusers_aria.distillation import DistillationLoss, convert_prediction, snr_weights

    teacher, student, sched = _kd_pair(tiny_teacher)
    with torch.no_grad():
        next(student.parameters()).add_(0.05)
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 8, 384, generator=g)
    noise, t = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([10, 500, 900])
    loss = DistillationLoss(1.0, 0.0, 0.0)
    plain = KDStep(teacher, student, sched, loss)(student, x, noise, t, h)
    perturbed = KDStep(teacher, student, sched, loss)(student, x, noise, t, h, input_noise=noise * 1.5)
    assert not torch.allclose(plain.total, perturbed.total)  # x_t is made from input_noise
    weighted = KDStep(teacher, student, sched, loss, snr_gamma=5.0)(student, x, noise, t, h)
    torch.testing.assert_close(weighted.total, plain.total * snr_weights(sched, t, 5.0))
    torch.testing.assert_close(weighted.output, plain.output)  # the reported terms stay unweighted
    # a v-prediction student of an epsilon teacher: output KD against the converted teacher prediction
    sched.register_to_config(prediction_type="v_prediction")
    kd = KDStep(teacher, student, sched, loss, teacher_prediction_type="epsilon")
    terms = kd(student, x, noise, t, h)
    noisy = sched.add_noise(x, noise, t)
    with torch.no_grad():
        t_pred = convert_prediction(teacher(noisy, t, h).sample, "epsilon", "v_prediction", noisy, t, sched)
        s_pred = student(noisy, t, h).sample
    expected = (s_pred - t_pred).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms.output, expected)
    assert not torch.allclose(terms.output, plain.output)


def test_train_length_follows_diffusers_arithmetic():
    from diffusers_aria.training.step import train_length

    # 10 rows, 2 per device, 2 processes: 3 micro-batches an epoch; 2 accumulated per optimizer step -> 2
    n = train_length(10, 2, num_processes=2, gradient_accumulation_steps=2, num_train_epochs=3)
    assert (n.max_train_steps, n.steps_per_epoch, n.num_train_epochs) == (6, 2, 3)
    n = train_length(10, 2, num_processes=2, gradient_accumulation_steps=2, max_train_steps=5, num_train_epochs=3)
    assert (n.max_train_steps, n.num_train_epochs) == (5, 3)  # max_train_steps overrides
    with pytest.raises(ValueError, match="--num_train_epochs 0"):
        train_length(10, 2, num_train_epochs=0)


def test_validation_due_by_steps_and_by_epochs():
    from diffusers_aria.training.step import validation_due

    # 3 steps an epoch: diffusers validates at the end of epochs 0, 2, 4 ... with --validation_epochs 2
    assert [s for s in range(1, 16) if validation_due(s, 3, 0, 2)] == [3, 9, 15]
    assert [s for s in range(1, 9) if validation_due(s, 3, 4, None)] == [4, 8]
    assert not any(validation_due(s, 3, 0, None) for s in range(1, 10))
