"""Tests for the per-sample KD losses and the prediction target helper."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_aria.distillation import DistillationLoss, FeatureProjections, LossTerms, prediction_target


def _hand_mse(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    out = []
    for i in range(a.shape[0]):
        diffs = (a[i] - b[i]).flatten().tolist()
        out.append(sum(d * d for d in diffs) / len(diffs))
    return out


def test_per_sample_values_match_hand_computation():
    gen = torch.Generator().manual_seed(0)
    s, t, y = (torch.randn(3, 4, 2, 2, generator=gen) for _ in range(3))
    sf, tf = torch.randn(3, 8, 2, 2, generator=gen), torch.randn(3, 8, 2, 2, generator=gen)
    sf2, tf2 = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    loss = DistillationLoss(lambda_kd_output=0.5, lambda_kd_feat=2.0, lambda_sd=3.0)
    terms = loss(
        s,
        t,
        student_feats={"s.a": sf, "s.b": sf2},
        teacher_feats={"t.a": tf, "t.b": tf2},
        feature_mapping={"t.a": "s.a", "t.b": "s.b"},
        target=y,
    )
    assert isinstance(terms, LossTerms)
    expected_out = torch.tensor(_hand_mse(s, t))
    expected_feat = torch.tensor(_hand_mse(sf, tf)) + torch.tensor(_hand_mse(sf2, tf2))
    expected_task = torch.tensor(_hand_mse(s, y))
    torch.testing.assert_close(terms.output, expected_out)
    torch.testing.assert_close(terms.feature, expected_feat)
    torch.testing.assert_close(terms.task, expected_task)
    torch.testing.assert_close(terms.total, 0.5 * expected_out + 2.0 * expected_feat + 3.0 * expected_task)
    for value in (terms.total, terms.output, terms.feature, terms.task):
        assert value.shape == (3,) and value.dtype == torch.float32


def test_zero_when_student_equals_teacher():
    x = torch.randn(2, 4, 3, 3)
    f = torch.randn(2, 5, 3, 3)
    terms = DistillationLoss()(x, x.clone(), {"s": f}, {"t": f.clone()}, {"t": "s"})
    assert torch.count_nonzero(terms.total) == 0
    assert torch.count_nonzero(terms.task) == 0


def test_task_term_is_masked():
    s = torch.ones(4, 1, 2, 2)
    target = torch.zeros(4, 1, 2, 2)
    mask = torch.tensor([True, False, True, False])
    terms = DistillationLoss(lambda_kd_output=0.0, lambda_kd_feat=0.0, lambda_sd=1.0)(
        s, s, target=target, paired_mask=mask
    )
    torch.testing.assert_close(terms.task, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(terms.total, terms.task)
    with pytest.raises(ValueError, match="paired_mask has 2 entries for a batch of 4"):
        DistillationLoss()(s, s, target=target, paired_mask=mask[:2])


def test_gradients_reach_student_only():
    student_pred = torch.randn(2, 4, 2, 2, requires_grad=True)
    teacher_pred = torch.randn(2, 4, 2, 2, requires_grad=True)
    student_feat = torch.randn(2, 3, 2, 2, requires_grad=True)
    teacher_feat = torch.randn(2, 6, 2, 2, requires_grad=True)
    proj = FeatureProjections({"t": "s"}, {"t": 6}, {"s": 3})
    terms = DistillationLoss()(
        student_pred, teacher_pred, {"s": student_feat}, {"t": teacher_feat}, {"t": "s"}, projections=proj
    )
    terms.total.mean().backward()
    assert student_pred.grad is not None and student_pred.grad.abs().sum() > 0
    assert student_feat.grad is not None and student_feat.grad.abs().sum() > 0
    assert proj.projections["t"].weight.grad is not None
    assert teacher_pred.grad is None and teacher_feat.grad is None


def test_half_inputs_give_float32_terms():
    s = torch.randn(2, 4, 8, 8).half()
    t = torch.randn(2, 4, 8, 8).half()
    terms = DistillationLoss(lambda_sd=1.0)(s, t, {"s": s}, {"t": t}, {"t": "s"}, target=t)
    for value in (terms.total, terms.output, terms.feature, terms.task):
        assert value.dtype == torch.float32
    torch.testing.assert_close(terms.output, torch.tensor(_hand_mse(s.float(), t.float())))


def test_missing_feature_and_shape_mismatch_raise():
    x = torch.randn(2, 4, 2, 2)
    with pytest.raises(KeyError, match="'t'"):
        DistillationLoss()(x, x, {"s": x}, {}, {"t": "s"})
    with pytest.raises(ValueError, match="Shape mismatch"):
        DistillationLoss()(x, torch.randn(2, 4, 4, 4))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_target(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    timesteps = torch.tensor([10, 900])
    target = prediction_target(scheduler, latents, noise, timesteps)
    if prediction_type == "epsilon":
        assert torch.equal(target, noise)
    elif prediction_type == "sample":
        assert torch.equal(target, latents)
    else:
        alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        torch.testing.assert_close(target, expected)


def test_prediction_target_unknown_type():
    scheduler = DDPMScheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match=r"'flow'.*epsilon"):
        prediction_target(scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def _scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def test_convert_prediction_matches_the_scheduler_and_round_trips():
    from diffusers_aria.distillation import convert_prediction

    sched = _scheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    xt = sched.add_noise(x0, eps, t)
    v = convert_prediction(eps, "epsilon", "v_prediction", xt, t, sched)
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(convert_prediction(eps, "epsilon", "sample", xt, t, sched), x0, atol=1e-3, rtol=1e-3)
    for kind, value in (("v_prediction", v), ("sample", x0)):
        torch.testing.assert_close(convert_prediction(value, kind, "epsilon", xt, t, sched), eps, atol=1e-3, rtol=1e-3)
    assert convert_prediction(eps, "epsilon", "epsilon", xt, t, sched) is eps
    with pytest.raises(ValueError, match="'flow' is not a prediction type"):
        convert_prediction(eps, "epsilon", "flow", xt, t, sched)


def test_snr_weights_are_min_snr_gamma():
    from diffusers.training_utils import compute_snr

    from diffusers_aria.distillation import snr_weights

    t = torch.tensor([1, 100, 400, 999])
    snr = compute_snr(_scheduler(), t)
    torch.testing.assert_close(snr_weights(_scheduler(), t, 5.0), torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(snr_weights(_scheduler("v_prediction"), t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    assert float(snr_weights(_scheduler(), t, 5.0)[-1]) == pytest.approx(1.0)  # low SNR: weight 1
    with pytest.raises(ValueError, match="snr_gamma=0"):
        snr_weights(_scheduler(), t, 0)
