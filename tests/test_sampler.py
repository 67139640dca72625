"""Drawing prompts by region (diffusers_aria/sampler.py)."""

from __future__ import annotations

import copy
import itertools
import logging
import pickle

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from diffusers_aria.dataloading import RegionCollate, region_dataloader
from diffusers_aria.regions import RegionsMismatchError
from diffusers_aria.rng import keyed_permutation
from diffusers_aria.sampler import AdaptiveRegionSampler

# 60 prompts in 4 regions of sizes 7, 13, 25, 15, interleaved in pool order
REGION_IDS = np.random.default_rng(0).permutation(np.repeat([0, 1, 2, 3], [7, 13, 25, 15]))
SIZES = np.bincount(REGION_IDS)


def _members(k: int) -> set[int]:
    return set(np.flatnonzero(REGION_IDS == k).tolist())


def _sampler(**kwargs) -> AdaptiveRegionSampler:
    return AdaptiveRegionSampler(REGION_IDS, **kwargs)


# ------------------------------------------------------------------------------------------- permutation


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 3000), st.integers(0, 2**64 - 1))
def test_property_keyed_permutation_is_a_bijection(n, key):
    out = keyed_permutation(np.arange(n), np.full(n, n), np.full(n, key, dtype=np.uint64))
    assert out.dtype == np.int64
    assert np.array_equal(np.sort(out), np.arange(n))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 65, 1000, 4097])
def test_keyed_permutation_bijection_for_sizes(n):
    for key in (0, 1, 2**63 + 5):
        out = keyed_permutation(np.arange(n), np.full(n, n), np.full(n, key, dtype=np.uint64))
        assert np.array_equal(np.sort(out), np.arange(n))


@pytest.mark.parametrize("n", [3, 7, 13, 100, 128, 129, 1000])
def test_keyed_permutation_image_of_a_position_is_uniform_over_keys(n):
    # tiny 4-round Feistel networks map a position unevenly over keys (chi2/df ~ 30 at n=7 over 40k
    # keys); the hash-rank path for n <= 128 and the network above it must both look uniform
    keys = np.arange(10**6, 10**6 + 20_000, dtype=np.uint64)
    for j in (0, n - 1):
        counts = np.bincount(keyed_permutation(np.full(keys.size, j), n, keys), minlength=n)
        chi2 = float(((counts - keys.size / n) ** 2 / (keys.size / n)).sum())
        df = n - 1
        assert chi2 < df + 5 * np.sqrt(2 * df), (n, j, chi2 / df)


def test_keyed_permutation_depends_on_key_and_is_elementwise():
    n = 500
    a = keyed_permutation(np.arange(n), np.full(n, n), np.full(n, 1, dtype=np.uint64))
    b = keyed_permutation(np.arange(n), np.full(n, n), np.full(n, 2, dtype=np.uint64))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(n))  # not the identity
    # mixed sizes and keys in one call give the same images as separate calls
    j = np.array([0, 3, 5, 2, 9])
    ns = np.array([4, 4, 10, 7, 10])
    keys = np.array([7, 7, 8, 9, 8], dtype=np.uint64)
    joint = keyed_permutation(j, ns, keys)
    for i in range(len(j)):
        assert joint[i] == keyed_permutation(j[i:i + 1], ns[i:i + 1], keys[i:i + 1])[0]
        assert 0 <= joint[i] < ns[i]


def test_keyed_permutation_broadcasts_scalar_size_and_key():
    n = 37
    out = keyed_permutation(np.arange(n), n, 12345)
    assert np.array_equal(out, keyed_permutation(np.arange(n), np.full(n, n), np.full(n, 12345, dtype=np.uint64)))
    assert np.array_equal(np.sort(out), np.arange(n))


# ------------------------------------------------------------------------------------------- draws


def test_draws_lie_in_their_region():
    s = _sampler(seed=3)
    for step in range(20):
        idx, reg = s.draw(step, 16)
        assert idx.dtype == np.int64 and idx.shape == reg.shape == (16,)
        assert np.array_equal(REGION_IDS[idx], reg)


@pytest.mark.parametrize("k", range(4))
def test_without_replacement_within_a_region(k):
    s = _sampler(seed=11)
    p = np.zeros(4)
    p[k] = 1.0
    s.set_probabilities(p)
    size = int(SIZES[k])
    first, _ = s.draw(0, size)
    second, reg = s.draw(1, size)
    assert sorted(first.tolist()) == sorted(_members(k))
    assert sorted(second.tolist()) == sorted(_members(k))
    assert np.all(reg == k)
    assert not np.array_equal(first, second)  # each pass is a fresh permutation
    # split across uneven steps the passes are still permutations
    parts = [s.draw(2 + i, m)[0] for i, m in enumerate([3, size - 3 + 2, size - 2])]
    flat = np.concatenate(parts)
    assert sorted(flat[:size].tolist()) == sorted(_members(k))
    assert sorted(flat[size:].tolist()) == sorted(_members(k))


def test_draw_counts_never_differ_by_more_than_one_within_a_region():
    s = _sampler(seed=4, probabilities=[0.1, 0.2, 0.3, 0.4])
    counts = np.zeros(len(REGION_IDS), dtype=np.int64)
    for step in range(40):
        idx, _ = s.draw(step, 23)
        np.add.at(counts, idx, 1)
    for k in range(4):
        c = counts[REGION_IDS == k]
        assert c.max() - c.min() <= 1, (k, c)
    np.testing.assert_array_equal(s.counters, [np.sum(counts[REGION_IDS == k]) for k in range(4)])


def test_empirical_region_frequencies_match_probabilities():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    s = _sampler(seed=5, probabilities=p)
    n_steps, per_step = 200, 50
    regions = np.concatenate([s.draw(step, per_step)[1] for step in range(n_steps)])
    observed = np.bincount(regions, minlength=4)
    expected = p * n_steps * per_step
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 21.1  # 99.99th percentile of chi-square with 3 degrees of freedom
    np.testing.assert_allclose(s.draw_shares(), observed / observed.sum(), rtol=1e-12)


def test_default_probabilities_are_prompt_uniform():
    s = _sampler()
    np.testing.assert_allclose(s.probabilities, SIZES / SIZES.sum(), rtol=1e-15)


def test_zero_probability_regions_are_never_drawn():
    s = _sampler(seed=6, probabilities=[0.0, 0.5, 0.0, 0.5])
    regions = np.concatenate([s.draw(step, 64)[1] for step in range(20)])
    assert set(regions.tolist()) == {1, 3}


def test_probabilities_are_normalised_and_accept_tensors():
    s = _sampler()
    s.set_probabilities(torch.tensor([1.0, 1.0, 1.0, 1.0]) * 3)
    np.testing.assert_allclose(s.probabilities, np.full(4, 0.25), rtol=1e-15)


def test_determinism_from_seed_and_step():
    a, b = _sampler(seed=7), _sampler(seed=7)
    for step in range(10):
        ia, ra = a.draw(step, 12)
        ib, rb = b.draw(step, 12)
        assert np.array_equal(ia, ib) and np.array_equal(ra, rb)
    # regions of a step do not depend on what was drawn before
    c = _sampler(seed=7)
    assert np.array_equal(c.draw_regions(9, 12), a.draw_regions(9, 12))


def test_different_seeds_differ():
    a, b = _sampler(seed=1), _sampler(seed=2)
    da = np.concatenate([a.draw(step, 12)[0] for step in range(5)])
    db = np.concatenate([b.draw(step, 12)[0] for step in range(5)])
    assert not np.array_equal(da, db)


def test_set_epoch_does_not_change_the_stream():
    # accelerate calls set_epoch with its own counter, which restarts at 0 in a resumed process: the draws are
    # keyed by the step alone (steps never repeat), so the epoch must not change them
    a, b = _sampler(seed=1), _sampler(seed=1)
    b.set_epoch(1)
    assert b.epoch == 1
    ra = np.concatenate([a.draw_regions(step, 12) for step in range(5)])
    rb = np.concatenate([b.draw_regions(step, 12) for step in range(5)])
    assert np.array_equal(ra, rb)
    ia = list(itertools.islice(iter(_sampler(seed=1, batch_size=8)), 40))
    s = _sampler(seed=1, batch_size=8)
    s.set_epoch(3)
    assert ia == list(itertools.islice(iter(s), 40))


def test_rank_slices_are_disjoint_pieces_of_the_global_draw():
    global_s = _sampler(seed=8)
    r0, r1 = _sampler(seed=8), _sampler(seed=8, num_replicas=2, rank=1)
    for step in range(15):
        gi, gr = global_s.draw(step, 20)
        i0, g0 = r0.draw(step, 10, num_replicas=2, rank=0)
        i1, g1 = r1.draw(step, 10)  # num_replicas/rank from the constructor
        assert np.array_equal(np.concatenate([i0, i1]), gi)
        assert np.array_equal(np.concatenate([g0, g1]), gr)
    # the per-region counters agree on every rank
    assert np.array_equal(r0.counters, r1.counters) and np.array_equal(r0.counters, global_s.counters)


def test_rank_slices_are_disjoint_within_a_pass():
    # one region and a global draw of exactly its size per step: the five ranks' slices partition it
    size = int(SIZES[2])
    assert size % 5 == 0
    ranks = [_sampler(seed=9, probabilities=[0, 0, 1, 0], num_replicas=5, rank=r) for r in range(5)]
    for step in range(3):
        slices = [set(s.draw(step, size // 5)[0].tolist()) for s in ranks]
        assert set().union(*slices) == _members(2)
        assert sum(len(x) for x in slices) == size


def test_iteration_with_replicas_yields_the_rank_slice():
    full = iter(_sampler(seed=10, batch_size=8))
    rank0 = iter(_sampler(seed=10, batch_size=8, num_replicas=2, rank=0))
    rank1 = iter(_sampler(seed=10, batch_size=8, num_replicas=2, rank=1))
    for _ in range(5):
        g = [next(full) for _ in range(8)]
        assert [next(rank0) for _ in range(4)] + [next(rank1) for _ in range(4)] == g


def test_iteration_matches_draw():
    s = _sampler(seed=12, batch_size=6)
    items = list(itertools.islice(iter(s), 18))
    ref = _sampler(seed=12)
    assert items == np.concatenate([ref.draw(step, 6)[0] for step in range(3)]).tolist()
    assert s.step == 3


# ------------------------------------------------------------------------------------------- state


def test_state_dict_continues_identical_stream(tmp_path):
    a = _sampler(seed=13, probabilities=[0.4, 0.3, 0.2, 0.1])
    for step in range(7):
        a.draw(step, 9)
    path = tmp_path / "sampler.pt"
    torch.save(a.state_dict(), path)
    b = _sampler(seed=0)  # seed and probabilities come from the state
    b.load_state_dict(torch.load(path, weights_only=True))
    assert b.seed == 13
    np.testing.assert_array_equal(b.probabilities, a.probabilities)
    for step in range(7, 20):
        ia, ra = a.draw(step, 9)
        ib, rb = b.draw(step, 9)
        assert np.array_equal(ia, ib) and np.array_equal(ra, rb)


def test_state_dict_continues_identical_iteration():
    a = _sampler(seed=14, batch_size=5)
    it = iter(a)
    head = [next(it) for _ in range(15)]  # three whole batches
    b = _sampler(seed=0, batch_size=5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.step == 3
    assert list(itertools.islice(iter(a), 25)) == list(itertools.islice(iter(b), 25))
    assert len(head) == 15


def test_load_state_mismatch_raises():
    state = _sampler().state_dict()
    with pytest.raises(ValueError, match=r"saved for 60 prompts, this sampler has 4"):
        AdaptiveRegionSampler([0, 1, 1, 0]).load_state_dict(state)
    other = AdaptiveRegionSampler(np.arange(60) % 3)
    with pytest.raises(ValueError, match=r"sampler state has 4 regions, this sampler has 3"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------------------------- DataLoader


def test_works_in_a_dataloader_with_workers():
    ds = datasets.Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(len(REGION_IDS))],
                                     "idx": list(range(len(REGION_IDS))),
                                     "region": REGION_IDS.tolist()})
    sampler = _sampler(seed=15, batch_size=6, num_samples=30)
    assert len(sampler) == 30
    loader = DataLoader(ds, sampler=sampler, batch_size=6, num_workers=2)
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    idx = torch.cat([b["idx"] for b in batches]).tolist()
    ref = _sampler(seed=15)
    expected = np.concatenate([ref.draw(step, 6)[0] for step in range(5)]).tolist()
    assert idx == expected
    for b in batches:
        assert b["prompt"] == [f"prompt number {i}" for i in b["idx"].tolist()]
        assert np.array_equal(b["region"].numpy(), REGION_IDS[b["idx"].numpy()])


def test_infinite_sampler_in_dataloader():
    ds = datasets.Dataset.from_dict({"idx": list(range(len(REGION_IDS)))})
    sampler = _sampler(seed=16, batch_size=4)
    with pytest.raises(TypeError, match=r"infinite .* has no length"):
        len(sampler)
    loader = DataLoader(ds, sampler=sampler, batch_size=4)
    batches = list(itertools.islice(iter(loader), 50))  # it keeps going past the pool size
    assert len(batches) == 50
    assert all(len(b["idx"]) == 4 for b in batches)


def test_finite_num_samples_truncates_iteration():
    s = _sampler(seed=17, batch_size=4, num_samples=10)
    assert len(s) == 10
    assert len(list(s)) == 10


# ------------------------------------------------------------------------------------------- read-ahead, resume


def test_read_ahead_delays_new_probabilities_by_that_many_draws():
    s = _sampler(seed=18, batch_size=4, read_ahead=3)
    s.set_probabilities([1, 0, 0, 0])  # before the first draw: at once
    it = iter(s)
    first = [next(it) for _ in range(8)]  # draws 0 and 1
    assert all(REGION_IDS[i] == 0 for i in first)
    s.mark_consumed()  # draw 0 trained on
    s.set_probabilities([0, 0, 0, 1])  # applies from draw 1 + 3 = 4
    rest = [next(it) for _ in range(16)]  # draws 2..5
    assert [int(REGION_IDS[i]) for i in rest] == [0] * 8 + [3] * 8
    np.testing.assert_array_equal(s.probabilities, [0, 0, 0, 1])  # the latest set, as the callback logs it


def _rows_dataset(n: int = len(REGION_IDS)) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"idx": list(range(n)), "prompt": [f"prompt {i}" for i in range(n)]})


def _collate(examples):  # like diffusers' collate_fn: a dict literal that keeps only what it knows
    return {"idx": torch.tensor([e["idx"] for e in examples])}


def _loader(num_workers: int, batch_size: int = 4, read_ahead: int | None = None, num_processes: int = 1):
    base = DataLoader(_rows_dataset(), shuffle=True, collate_fn=_collate, batch_size=batch_size,
                      num_workers=num_workers)
    return region_dataloader(base, REGION_IDS, num_processes=num_processes, seed=21, read_ahead=read_ahead)


def _train(loader, micro_batches: int, accum: int = 2, seen=None, save_at: int | None = None):
    """A training loop's use of the sampler: one mark per micro-batch, new probabilities every `accum`; the
    probabilities depend on everything trained so far, as ARIA's do. Returns (trained indices, saved state)."""
    sampler, trained, saved = loader.sampler, [], None
    seen = np.zeros(len(SIZES)) if seen is None else seen.copy()
    done = sampler.consumed
    while done < micro_batches:  # epochs, restarted like a resumed diffusers script restarts its epoch
        for batch in loader:
            idx = batch["idx"].tolist()
            assert batch["aria_region"].tolist() == REGION_IDS[idx].tolist()
            trained.append(idx)
            sampler.mark_consumed()
            done += 1
            np.add.at(seen, REGION_IDS[idx], 1.0)
            if done % accum == 0:
                sampler.set_probabilities(1.0 / (1.0 + seen) ** 2)
                if done == save_at:
                    saved = (copy.deepcopy(sampler.state_dict()), seen.copy())
            if done == micro_batches:
                break
    return trained, saved


def test_index_stream_does_not_depend_on_when_the_dataloader_reads(caplog):
    # the same read_ahead with and without workers: the same stream across three epochs (15 draws each)
    a, _ = _train(_loader(num_workers=0, read_ahead=6), 40)
    b, _ = _train(_loader(num_workers=2), 40)  # default read_ahead: 2 * 2 + 2 = 6
    assert a == b
    assert "not exact" not in caplog.text
    # without the delay the probabilities reach the draws at read-time, which differs with workers
    c, _ = _train(_loader(num_workers=2, read_ahead=0), 40)
    assert c != a


def test_resume_continues_the_stream_and_the_state_does_not_depend_on_read_ahead(caplog):
    # saved mid-epoch 2, with prefetch_factor * num_workers = 4 draws requested but not trained on
    full, saved = _train(_loader(num_workers=2), 40, save_at=18)
    state, seen = saved
    assert state["step"] == state["consumed"] == 18 and state["read_ahead"] == 6
    # the same position reached without workers (1 draw read ahead) saves the same state
    _, same = _train(_loader(num_workers=0, read_ahead=6), 40, save_at=18)
    assert same[0].keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(value, same[0][key]) if torch.is_tensor(value) else value == same[0][key], key
    state = torch.load(_roundtrip(state), weights_only=True)
    for workers in (0, 2):  # resumed with or without workers (the saved read_ahead is kept)
        loader = _loader(num_workers=workers)
        loader.sampler.load_state_dict(copy.deepcopy(state))
        assert loader.sampler.read_ahead == 6
        resumed, _ = _train(loader, 40, seen=seen)
        assert resumed == full[18:]
    assert "not exact" not in caplog.text


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_reading_further_ahead_than_read_ahead_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers_aria.sampler"):
        _train(_loader(num_workers=2, read_ahead=1), 6)
    assert "more than read_ahead=1 ahead" in caplog.text and "not exact under resume" in caplog.text


# ------------------------------------------------------------------------------------------- region_dataloader


def test_region_dataloader_keeps_the_arguments_and_adds_the_region():
    base = DataLoader(_rows_dataset(), shuffle=True, collate_fn=_collate, batch_size=4, num_workers=2,
                      prefetch_factor=3, drop_last=True, timeout=30)
    dl = region_dataloader(base, REGION_IDS, num_processes=2, seed=5)
    assert (dl.num_workers, dl.prefetch_factor, dl.drop_last, dl.timeout, dl.batch_size) == (2, 3, True, 30, 4)
    s = dl.sampler
    assert isinstance(s, AdaptiveRegionSampler) and s.seed == 5 and s.read_ahead == 3 * 2 + 2
    # the global draw is shared by 2 processes: 8 indices a step, 56 a "epoch" (60 rounded down to whole draws)
    assert s.batch_size == 8 and len(s) == 56 and len(dl) == 14
    assert isinstance(dl.collate_fn, RegionCollate) and dl.collate_fn.collate_fn is _collate
    batch = next(iter(dl))
    assert set(batch) == {"idx", "aria_region"}
    assert batch["aria_region"].tolist() == REGION_IDS[batch["idx"].numpy()].tolist()


def test_region_dataloader_keeps_a_with_transform_and_seed_none():
    def transform(examples):  # diffusers' preprocess_train: add keys, return the input dict
        examples["double"] = [2 * i for i in examples["idx"]]
        return examples

    base = DataLoader(_rows_dataset().with_transform(transform), shuffle=True, batch_size=3)
    dl = region_dataloader(base, REGION_IDS, seed=None)
    batch = next(iter(dl))
    assert dl.sampler.seed == 0 and dl.sampler.read_ahead == 2
    assert batch["double"].tolist() == [2 * i for i in batch["idx"].tolist()]
    assert batch["aria_region"].tolist() == REGION_IDS[batch["idx"].numpy()].tolist()


def test_region_collate_is_picklable_and_explains_a_missing_column():
    collate = pickle.loads(pickle.dumps(RegionCollate(_collate)))
    out = collate([{"idx": 3, "aria_region": 1}, {"idx": 4, "aria_region": 0}])
    assert out["idx"].tolist() == [3, 4] and out["aria_region"].dtype == torch.long
    with pytest.raises(KeyError, match="no 'aria_region' column .*add_to_dataset"):
        collate([{"idx": 3}])
    with pytest.raises(TypeError, match="return a dict, got list"):
        RegionCollate(lambda ex: [e["idx"] for e in ex])([{"idx": 1, "aria_region": 0}])


def test_region_dataloader_refusals():
    ds = _rows_dataset()
    with pytest.raises(RegionsMismatchError, match="regions cover 59 rows but the DataLoader's dataset has 60"):
        region_dataloader(DataLoader(ds, batch_size=2), REGION_IDS[:59])
    with pytest.raises(ValueError, match="already has a custom sampler"):
        region_dataloader(DataLoader(ds, batch_size=2, sampler=_sampler()), REGION_IDS)
    with pytest.raises(ValueError, match="custom batch_sampler"):
        region_dataloader(DataLoader(ds, batch_sampler=[[0, 1]]), REGION_IDS)
    with pytest.raises(TypeError, match="needs a datasets.Dataset"):
        region_dataloader(DataLoader(list(range(60)), batch_size=2), REGION_IDS)
    with pytest.raises(ValueError, match="num_processes=0"):
        region_dataloader(DataLoader(ds, batch_size=2), REGION_IDS, num_processes=0)
    with pytest.raises(ValueError, match="read_ahead=-1"):
        _sampler(read_ahead=-1)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "ids, message",
    [
        ([], r"non-empty 1-D array"),
        (np.zeros((2, 3), dtype=np.int64), r"non-empty 1-D array"),
        ([0, 1, -1], r"non-negative integers"),
        ([0.0, 1.0], r"non-negative integers"),
        ([0, 2, 2, 0], r"regions \[1\] have no prompts; region ids must be contiguous"),
    ],
)
def test_bad_region_ids_raise(ids, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveRegionSampler(ids)


@pytest.mark.parametrize(
    "p, message",
    [
        ([0.5, 0.5], r"got 2 probabilities for 4 regions"),
        ([0.5, 0.5, 0.5, 0.5, 0.5], r"got 5 probabilities for 4 regions"),
        ([0.5, -0.1, 0.3, 0.3], r"must be finite, non-negative and not all zero"),
        ([0.0, 0.0, 0.0, 0.0], r"must be finite, non-negative and not all zero"),
        ([np.nan, 0.5, 0.3, 0.2], r"must be finite, non-negative and not all zero"),
    ],
)
def test_bad_probabilities_raise(p, message):
    with pytest.raises(ValueError, match=message):
        _sampler(probabilities=p)
    with pytest.raises(ValueError, match=message):
        _sampler().set_probabilities(p)


def test_bad_batch_size_and_rank_raise():
    with pytest.raises(ValueError, match=r"batch_size=0 must be >= 1"):
        _sampler(batch_size=0)
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, num_replicas=2\)"):
        _sampler(num_replicas=2, rank=2)
    s = _sampler(batch_size=5, num_replicas=2)
    with pytest.raises(ValueError, match=r"batch_size=5 must be divisible by num_replicas=2"):
        next(iter(s))


def test_a_ranks_slice_is_exactly_that_slice_of_the_whole_draw():
    """`draw` computes only its own rank's prompts (the permutation is most of a draw's cost), yet returns exactly
    the slice of the global draw, and every rank's counters advance by the whole draw."""
    ids = np.random.default_rng(0).integers(0, 40, 3000)
    ids[:40] = np.arange(40)
    probs = np.random.default_rng(1).dirichlet(np.ones(40))
    whole = AdaptiveRegionSampler(ids, seed=5, probabilities=probs)
    ranks = [AdaptiveRegionSampler(ids, seed=5, probabilities=probs) for _ in range(4)]
    for step in range(60):  # long enough for small regions to start new cycles
        idx, reg = whole.draw_global(step, 4 * 16)
        for r, smp in enumerate(ranks):
            i, g = smp.draw(step, 16, num_replicas=4, rank=r)
            np.testing.assert_array_equal(i, idx[r * 16:(r + 1) * 16])
            np.testing.assert_array_equal(g, reg[r * 16:(r + 1) * 16])
            np.testing.assert_array_equal(smp.counters, whole.counters)
    counts = [3, 0, 7, 2]
    idx, reg = whole.draw_global(60, sum(counts))
    i, g = ranks[2].draw_counts(60, counts, rank=2)
    np.testing.assert_array_equal(i, idx[3:10])
    np.testing.assert_array_equal(g, reg[3:10])
