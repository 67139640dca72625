"""Random Conditioning with region-drawn prompts (diffusers_aria/conditioning.py)."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from diffusers_aria.conditioning import NULL_REGION, RandomConditioning, SwapSchedule, feed_mask
from diffusers_aria.sampler import AdaptiveRegionSampler

T = 1000
POOL = [f"pool prompt {i}" for i in range(40)]
POOL_REGIONS = np.arange(40) % 4


def _rc(schedule=None, null_prompt_prob=0.0, seed=0, pool=POOL, regions=None, sampler_seed=0):
    sampler = AdaptiveRegionSampler(POOL_REGIONS, seed=sampler_seed)
    return RandomConditioning(sampler, pool, schedule=schedule, null_prompt_prob=null_prompt_prob, seed=seed,
                              regions=regions)


def _captions(n, step=0):
    return [f"caption {step}-{i}" for i in range(n)]


# ------------------------------------------------------------------------------------------- schedules


def test_exponential_schedule_values():
    s = SwapSchedule("exponential", lam=5.0, num_train_timesteps=T)
    p = s(torch.tensor([0, T - 1, T // 2]))
    assert p.dtype == torch.float64
    assert p[0].item() == pytest.approx(math.exp(-5.0), rel=1e-12)
    assert p[1].item() == pytest.approx(math.exp(-5.0 * (1 - (T - 1) / T)), rel=1e-12)
    assert p[2].item() == pytest.approx(math.exp(-2.5), rel=1e-12)
    assert SwapSchedule().kind == "exponential" and SwapSchedule().lam == 5.0  # the RC default


def test_sigmoid_schedule_is_monotone():
    s = SwapSchedule("sigmoid", lam=10.0, center=0.4)
    p = s(torch.arange(T)).numpy()
    assert np.all(np.diff(p) > 0)
    assert np.all((p > 0) & (p < 1))
    assert s(torch.tensor([400])).item() == pytest.approx(0.5, abs=1e-12)


def test_constant_schedule():
    s = SwapSchedule("constant", value=0.3)
    np.testing.assert_array_equal(s(torch.arange(0, T, 7)).numpy(), 0.3)
    assert s.mean() == pytest.approx(0.3, rel=1e-12)


def test_schedule_mean_is_average_over_timesteps():
    s = SwapSchedule("exponential", lam=5.0)
    expected = sum(math.exp(-5.0 * (1 - t / T)) for t in range(T)) / T
    assert s.mean() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "linear"}, r"rc schedule 'linear' is not valid; choose one of exponential, sigmoid, constant"),
        ({"kind": "constant", "value": 1.5}, r"constant swap probability 1.5 must lie in \[0, 1\]"),
        ({"kind": "constant", "value": -0.1}, r"constant swap probability -0.1 must lie in \[0, 1\]"),
        ({"lam": -1.0}, r"rc lambda -1.0 must be >= 0"),
    ],
)
def test_bad_schedule_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SwapSchedule(**kwargs)


def test_bad_null_probability_and_pool_size_raise():
    with pytest.raises(ValueError, match=r"null_prompt_prob=1.5 must lie in \[0, 1\]"):
        _rc(null_prompt_prob=1.5)
    with pytest.raises(ValueError, match=r"null_prompt_prob=-0.2 must lie in \[0, 1\]"):
        _rc(null_prompt_prob=-0.2)
    with pytest.raises(ValueError, match=r"the pool has 39 prompts but the sampler covers 40"):
        _rc(pool=POOL[:-1])


def test_caption_count_mismatch_raises():
    with pytest.raises(ValueError, match=r"got 3 captions for 4 timesteps"):
        _rc()(0, torch.zeros(4, dtype=torch.long), _captions(3))


# ------------------------------------------------------------------------------------------- swapping


def test_swap_frequency_matches_constant_probability():
    rc = _rc(SwapSchedule("constant", value=0.3))
    swapped = []
    for step in range(100):
        swapped.append(rc(step, torch.randint(0, T, (40,)), _captions(40, step)).swapped)
    s = torch.cat(swapped).double()
    n = s.numel()
    assert abs(s.mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)


def test_swap_frequency_follows_exponential_schedule():
    sched = SwapSchedule("exponential", lam=5.0)
    rc = _rc(sched)
    gen = torch.Generator().manual_seed(0)
    swapped, probs, ts = [], [], []
    for step in range(150):
        t = torch.randint(0, T, (40,), generator=gen)
        swapped.append(rc(step, t, _captions(40, step)).swapped)
        probs.append(sched(t))
        ts.append(t)
    s, p, t = torch.cat(swapped).double(), torch.cat(probs), torch.cat(ts)
    # overall count within 4 standard deviations of the expected count
    assert abs(s.sum().item() - p.sum().item()) < 4 * math.sqrt((p * (1 - p)).sum().item())
    # high timesteps swap far more often than low ones
    low, high = s[t < 200].mean().item(), s[t >= 800].mean().item()
    assert high > 0.5 and low < 0.05


def test_captions_kept_where_not_swapped_and_pool_prompts_where_swapped():
    rc = _rc(SwapSchedule("constant", value=0.5))
    sampler_regions = POOL_REGIONS
    seen_swap = seen_keep = 0
    for step in range(20):
        caps = _captions(16, step)
        out = rc(step, torch.randint(0, T, (16,)), caps, caption_region_ids=np.full(16, 2))
        assert len(out.prompts) == 16
        assert out.swapped.dtype == torch.bool
        assert out.region_ids.dtype == torch.long and out.pool_indices.dtype == torch.long
        for i in range(16):
            if out.swapped[i]:
                seen_swap += 1
                k = int(out.pool_indices[i])
                assert out.prompts[i] == POOL[k]
                assert int(out.region_ids[i]) == sampler_regions[k]
            else:
                seen_keep += 1
                assert out.prompts[i] == caps[i]
                assert int(out.pool_indices[i]) == -1
                assert int(out.region_ids[i]) == 2  # the given caption region
    assert seen_swap > 50 and seen_keep > 50


def test_swapped_prompts_follow_the_sampler_draw():
    rc = _rc(SwapSchedule("constant", value=1.0))
    ref = AdaptiveRegionSampler(POOL_REGIONS, seed=0)
    for step in range(5):
        out = rc(step, torch.zeros(8, dtype=torch.long), _captions(8, step))
        idx, reg = ref.draw(step, 8)
        assert out.swapped.all()
        assert out.pool_indices.tolist() == idx.tolist()
        assert out.region_ids.tolist() == reg.tolist()
        assert out.prompts == [POOL[i] for i in idx]


def test_sampler_probabilities_steer_the_regions():
    rc = _rc(SwapSchedule("constant", value=1.0))
    rc.sampler.set_probabilities([0.0, 0.0, 1.0, 0.0])
    out = rc(0, torch.zeros(12, dtype=torch.long), None)
    assert set(out.region_ids.tolist()) == {2}
    assert all(POOL_REGIONS[POOL.index(p)] == 2 for p in out.prompts)


def test_pool_as_dataset():
    ds = datasets.Dataset.from_dict({"prompt": POOL})
    rc = _rc(SwapSchedule("constant", value=1.0), pool=ds)
    out = rc(0, torch.zeros(6, dtype=torch.long), _captions(6))
    assert out.prompts == [POOL[i] for i in out.pool_indices.tolist()]


def test_image_free_mode_swaps_everything():
    rc = _rc(SwapSchedule("constant", value=0.0))  # the schedule does not matter without captions
    out = rc(3, torch.randint(0, T, (10,)), None)
    assert out.swapped.all()
    assert all(p in POOL for p in out.prompts)
    assert torch.all(out.pool_indices >= 0)
    assert out.region_ids.tolist() == POOL_REGIONS[out.pool_indices.numpy()].tolist()


def test_zero_swap_probability_keeps_all_captions():
    rc = _rc(SwapSchedule("constant", value=0.0))
    caps = _captions(10)
    out = rc(0, torch.randint(0, T, (10,)), caps)
    assert out.prompts == caps
    assert not out.swapped.any()
    assert out.region_ids.tolist() == [NULL_REGION] * 10  # no regions and no ids: unknown


def test_decisions_are_deterministic_and_depend_on_rank():
    a = _rc(SwapSchedule("constant", value=0.5), seed=4)
    b = _rc(SwapSchedule("constant", value=0.5), seed=4)
    t = torch.randint(0, T, (32,))
    oa, ob = a(7, t, _captions(32)), b(7, t, _captions(32))
    assert oa.prompts == ob.prompts and torch.equal(oa.swapped, ob.swapped)
    c = _rc(SwapSchedule("constant", value=0.5), seed=4)
    swapped_rank1, _ = c.decide(7, t, rank=1)
    assert not torch.equal(swapped_rank1, oa.swapped)


def test_pool_prompts_are_drawn_only_for_the_samples_that_use_one():
    rc = _rc(SwapSchedule("constant", value=0.5), null_prompt_prob=0.2)
    ref = AdaptiveRegionSampler(POOL_REGIONS, seed=0)
    used = 0
    for step in range(20):
        out = rc(step, torch.randint(0, T, (16,)), _captions(16, step))
        is_null = np.array([p == "" for p in out.prompts])
        use = out.swapped.numpy() & ~is_null
        assert np.all(out.pool_indices.numpy()[~use] == -1)
        expected, _ = ref.draw(step, int(use.sum()))  # the global draw holds exactly the used prompts, in order
        assert out.pool_indices.numpy()[use].tolist() == expected.tolist()
        used += int(use.sum())
    assert 0 < used < 20 * 16 and rc.sampler.counters.sum() == used  # draws count prompts trained on


def test_ranks_with_different_swap_counts_take_their_slices_of_one_draw():
    t = torch.randint(0, T, (12,), generator=torch.Generator().manual_seed(3))
    ranks = [_rc(SwapSchedule("constant", value=0.4), null_prompt_prob=0.1) for _ in range(2)]
    ref = AdaptiveRegionSampler(POOL_REGIONS, seed=0)
    for step in range(6):
        needs = []
        for r, rc in enumerate(ranks):
            swapped, nulls = rc.decide(step, t, rank=r)
            needs.append(int((swapped.numpy() & ~nulls).sum()))
        outs = []
        for r, rc in enumerate(ranks):
            rc.gather_counts = lambda m, needs=needs: needs  # what an all-gather would return
            outs.append(rc(step, t, _captions(12, step), rank=r, num_replicas=2))
        drawn = [i for o in outs for i in o.pool_indices.tolist() if i >= 0]
        assert drawn == ref.draw(step, sum(needs))[0].tolist()
    assert np.array_equal(ranks[0].sampler.counters, ranks[1].sampler.counters)


def test_several_ranks_with_captions_need_gather_counts():
    rc = _rc(SwapSchedule("constant", value=0.5))
    with pytest.raises(ValueError, match="gather_counts"):
        rc(0, torch.zeros(4, dtype=torch.long), _captions(4), rank=0, num_replicas=2)
    rc.gather_counts = lambda m: [m]  # one count for two ranks
    with pytest.raises(ValueError, match="1 counts for num_replicas=2"):
        rc(0, torch.zeros(4, dtype=torch.long), _captions(4), rank=0, num_replicas=2)


def test_ranks_take_disjoint_slices_of_the_global_draw():
    full = _rc(SwapSchedule("constant", value=1.0))
    r0, r1 = _rc(SwapSchedule("constant", value=1.0)), _rc(SwapSchedule("constant", value=1.0))
    t = torch.zeros(6, dtype=torch.long)
    g = full.sampler.draw(0, 12)[0].tolist()
    o0 = r0(0, t, None, rank=0, num_replicas=2)
    o1 = r1(0, t, None, rank=1, num_replicas=2)
    assert o0.pool_indices.tolist() + o1.pool_indices.tolist() == g


# ------------------------------------------------------------------------------------------- null prompts


def test_null_prompt_dropout_rate_and_region():
    rc = _rc(SwapSchedule("constant", value=0.5), null_prompt_prob=0.2)
    nulls = total = 0
    for step in range(60):
        caps = _captions(32, step)
        out = rc(step, torch.randint(0, T, (32,)), caps, caption_region_ids=np.ones(32, dtype=np.int64))
        is_null = np.array([p == "" for p in out.prompts])
        regions = out.region_ids.numpy()
        assert np.all(regions[is_null] == NULL_REGION)
        assert np.all(regions[~is_null] >= 0)
        kept = [p for p, z in zip(out.prompts, is_null) if not z]
        assert all(p in POOL or p in caps for p in kept)
        nulls += int(is_null.sum())
        total += 32
    rate = nulls / total
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / total)


def test_null_prompt_probability_one_drops_everything():
    rc = _rc(null_prompt_prob=1.0)
    out = rc(0, torch.randint(0, T, (8,)), None)
    assert out.prompts == [""] * 8
    assert out.region_ids.tolist() == [NULL_REGION] * 8


# ------------------------------------------------------------------------------------------- caption regions


def test_caption_regions_from_regions_assign(topic_regions, topic_pool):
    prompts, topics = topic_pool
    sampler = AdaptiveRegionSampler(np.asarray(topic_regions.region_ids), seed=0)
    rc = RandomConditioning(sampler, prompts, schedule=SwapSchedule("constant", value=0.0), regions=topic_regions)
    captions = ["a wild jaguar animal hunting in the jungle", "a delicious bowl of pho food served for dinner",
                "a wild jaguar animal hunting in the jungle"]
    ids = np.asarray(topic_regions.region_ids)
    region_of = {topic: int(np.bincount(ids[np.asarray(topics) == topic]).argmax()) for topic in set(topics)}
    out = rc(0, torch.zeros(3, dtype=torch.long), captions)
    assert out.prompts == captions
    assert out.region_ids.tolist() == [region_of["animals"], region_of["food"], region_of["animals"]]
    # captions are assigned once and remembered
    calls = []
    original = topic_regions.assign

    def counting_assign(texts, *args, **kwargs):
        calls.append(list(texts))
        return original(texts, *args, **kwargs)

    rc.regions = type("Wrapped", (), {"assign": staticmethod(counting_assign)})()
    again = rc(1, torch.zeros(3, dtype=torch.long), captions)
    assert again.region_ids.tolist() == out.region_ids.tolist()
    assert calls == []


def test_explicit_caption_region_ids_take_precedence():
    class ExplodingRegions:
        def assign(self, texts):
            raise AssertionError("assign must not run when caption_region_ids are given")

    rc = _rc(SwapSchedule("constant", value=0.0), regions=ExplodingRegions())
    out = rc(0, torch.zeros(4, dtype=torch.long), _captions(4), caption_region_ids=torch.tensor([3, 0, 1, 3]))
    assert out.region_ids.tolist() == [3, 0, 1, 3]


def test_caption_region_cache_overflow_keeps_current_batch():
    class FixedRegions:
        def assign(self, texts):
            return np.full(len(texts), 3, dtype=np.int32)

    rc = _rc(SwapSchedule("constant", value=0.0), regions=FixedRegions())
    rc._assigned.update((f"old caption {i}", 3) for i in range(100_000))  # the cache is full
    captions = [*_captions(3), "old caption 7"]  # new captions and one that was cached
    out = rc(0, torch.zeros(4, dtype=torch.long), captions)
    assert out.region_ids.tolist() == [3, 3, 3, 3]
    assert len(rc._assigned) <= 100_000


# ------------------------------------------------------------------------------------------- feeds
def test_feed_mask_picks_all_the_swaps_or_paired_samples_and_noise_dominated_swaps():
    from diffusers_aria.embedded.tiny_teacher import tiny_scheduler  # Stable Diffusion's scaled-linear betas

    ab = tiny_scheduler().alphas_cumprod
    swapped = torch.tensor([True, True, True, False, False])
    t = torch.tensor([10, 353, 354, 10, 900])
    assert feed_mask("all", swapped, t, ab) is None
    assert feed_mask("swapped", swapped, t, ab).tolist() == [True, True, True, False, False]
    # paired samples always; a swap only where at most half of x_t's variance is the paired image
    assert float(ab[353]) > 0.5 >= float(ab[354])
    assert feed_mask("congruent", swapped, t, ab).tolist() == [False, False, True, True, True]
    assert feed_mask("congruent", swapped, t, ab, max_signal=0.9).tolist() == [False, True, True, True, True]
    # under RC's exponential p(t) few swaps are dropped, with a constant p(t) about a third
    tt = torch.arange(1000)
    dropped = (ab[tt] > 0.5).double()
    exp_p = SwapSchedule("exponential")(tt)
    assert float((exp_p * dropped).sum() / exp_p.sum()) < 0.04
    assert 0.3 < float(dropped.mean()) < 0.4
    with pytest.raises(ValueError, match="feed 'x' is not valid; choose one of all, swapped, congruent"):
        feed_mask("x", swapped)
    with pytest.raises(ValueError, match="needs the batch's timesteps"):
        feed_mask("congruent", swapped, t)
