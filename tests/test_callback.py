"""ARIACallback: single-process behaviour, and two real processes (accelerate, gloo on CPU)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from diffusers_aria import (
    AdaptiveRegionSampler,
    ARIAAllocation,
    ARIACallback,
    DiscrepancyTracker,
    RegionTree,
    make_policy,
)

K = 6
SIZES = np.array([40, 30, 10, 10, 5, 5])
REGION_IDS = np.repeat(np.arange(K), SIZES)
STEPS, PER_RANK = 12, 8


def _losses(step: int, rank: int, regions: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([step, rank])
    # region 4 is consistently harder; rank 1 sees noisier losses than rank 0
    return 1.0 + 0.4 * (regions == 4) + (0.05 + 0.1 * rank) * rng.standard_normal(regions.size)


def _objects(accelerator=None, warmup: int = 2):
    sampler = AdaptiveRegionSampler(REGION_IDS, seed=3)
    tracker = DiscrepancyTracker(K, half_life=20, num_timestep_bins=4)
    # the regions come with a tree (two coarse nodes), and the reducibility test runs: its state must resume too
    policy = ARIAAllocation(sampler.sizes, warmup_steps=warmup, damping=0.5, stall_draws=8.0, refresh_every=2,
                            tree=RegionTree(np.array([[0, 0, 0, 1, 1, 1]])))
    return ARIACallback(accelerator, sampler, tracker, policy, log_every=1)


def _run_steps(cb: ARIACallback, steps, rank: int, world: int, log: list):
    for step in steps:
        idx, reg = cb.sampler.draw(step, PER_RANK, num_replicas=world, rank=rank)
        t = (np.arange(PER_RANK) * 97 + step * 13 + rank * 7) % 1000
        loss = _losses(step, rank, reg)
        cb.on_step_end(step, torch.from_numpy(reg), torch.from_numpy(loss), torch.from_numpy(t))
        log.append({"step": step, "idx": idx.tolist(), "reg": reg.tolist(), "loss": loss.tolist(), "t": t.tolist(),
                    "probs": cb.sampler.probabilities.tolist()})


def _two_process_worker(out_dir: str) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
    rank = acc.process_index
    cb = _objects(acc)
    log: list = []
    _run_steps(cb, range(STEPS // 2), rank, 2, log)
    acc.save_state(os.path.join(out_dir, "ckpt"))
    _run_steps(cb, range(STEPS // 2, STEPS), rank, 2, log)
    estimates = cb.tracker.estimates().tolist()
    # a fresh set of objects restored from the checkpoint continues the identical stream
    acc2_cb = _objects(acc)
    acc.load_state(os.path.join(out_dir, "ckpt"))
    resumed: list = []
    _run_steps(acc2_cb, range(STEPS // 2, STEPS), rank, 2, resumed)
    # gradient accumulation: micro-batches buffered per rank, one gathered update per optimizer step
    ga = _objects(acc, warmup=0)
    ga_probs = []
    for step in range(GA_STEPS):
        for reg, loss, t in _ga_micro_batches(step, rank):
            ga.accumulate(torch.from_numpy(reg), torch.from_numpy(loss), torch.from_numpy(t))
        ga_probs.append(ga.on_step_end(step + 1).tolist())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"log": log, "resumed": resumed, "world": acc.num_processes,
                   "estimates": estimates, "ga_probs": ga_probs, "ga_updates": ga.tracker.num_updates,
                   "ga_s1": ga.tracker.s1.tolist()}, fh)


GA_STEPS = 4


def _ga_micro_batches(step: int, rank: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rank r's micro-batches of optimizer step `step`: two each, except step 1 (rank 1 has none) and step 2
    (no rank has any), so on_step_end runs with an empty buffer on one rank and on every rank."""
    count = {1: 1 - rank, 2: 0}.get(step, 2)
    out = []
    for m in range(count):
        rng = np.random.default_rng([step, rank, m])
        reg = rng.integers(0, K, 5)
        out.append((reg, 1.0 + 0.5 * (reg == 4) + 0.1 * rng.standard_normal(5), rng.integers(0, 1000, 5)))
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, debug_launch):
    out = tmp_path_factory.mktemp("two_proc")
    debug_launch(_two_process_worker, args=(str(out),), num_processes=2)
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)], out


def test_two_processes_hold_identical_probabilities(two_process_run):
    (r0, r1), _ = two_process_run
    assert r0["world"] == r1["world"] == 2
    for a, b in zip(r0["log"], r1["log"]):
        assert a["probs"] == b["probs"]  # bit-identical on both ranks
    assert r0["estimates"] == r1["estimates"]
    # allocation moved toward the consistently harder region 4 ...
    path = [entry["probs"][4] for entry in r0["log"]]
    assert max(path) > SIZES[4] / SIZES.sum() * 1.5
    # ... and its excess did not fall over its trial (stall_draws=8): the reducibility test gives the mass back
    assert path[-1] < 0.5 * max(path)


def test_two_process_draws_are_disjoint_slices_of_one_global_draw(two_process_run):
    (r0, r1), _ = two_process_run
    ref = AdaptiveRegionSampler(REGION_IDS, seed=3)
    ref.set_probabilities(_objects().policy.probabilities)  # the callback starts the sampler at the policy's prior
    for a, b in zip(r0["log"], r1["log"]):
        before = ref.counters.copy()
        glob, _ = ref.draw_global(a["step"], 2 * PER_RANK)
        assert a["idx"] + b["idx"] == glob.tolist()
        ref.set_probabilities(a["probs"])
        # an index repeats across ranks only in a region whose permutation pass ended within this step
        wrapped = before // SIZES != (ref.counters - 1) // SIZES
        shared = set(a["idx"]) & set(b["idx"])
        assert all(wrapped[REGION_IDS[i]] for i in shared)
        # within one pass of a region's permutation the two ranks never draw the same prompt
        for r in np.flatnonzero(~wrapped):
            drawn = [i for i in a["idx"] + b["idx"] if REGION_IDS[i] == r]
            assert len(set(drawn)) == len(drawn)


def test_distributed_update_equals_single_process_on_concatenated_data(two_process_run):
    (r0, r1), _ = two_process_run
    cb = _objects()
    for a, b in zip(r0["log"], r1["log"]):
        cb.on_step_end(a["step"], np.array(a["reg"] + b["reg"]), np.array(a["loss"] + b["loss"]),
                       np.array(a["t"] + b["t"]))
        assert cb.sampler.probabilities.tolist() == a["probs"]
    assert cb.tracker.estimates().tolist() == r0["estimates"]


def test_two_process_accumulation_is_one_update_per_step_even_with_empty_buffers(two_process_run):
    (r0, r1), _ = two_process_run
    assert r0["ga_probs"] == r1["ga_probs"] and r0["ga_s1"] == r1["ga_s1"]
    assert r0["ga_updates"] == r1["ga_updates"] == GA_STEPS
    cb = _objects(warmup=0)  # one process fed every rank's micro-batches of a step at once
    for step in range(GA_STEPS):
        parts = _ga_micro_batches(step, 0) + _ga_micro_batches(step, 1)
        if parts:
            reg, loss, t = (np.concatenate(x) for x in zip(*parts))
            probs = cb.on_step_end(step + 1, reg, loss, t)
        else:
            probs = cb.on_step_end(step + 1)
        assert probs.tolist() == r0["ga_probs"][step]
    assert cb.tracker.s1.tolist() == r0["ga_s1"]


def test_accumulate_then_on_step_end_is_one_update_of_all_micro_batches():
    micro = [_ga_micro_batches(0, 0)[0], _ga_micro_batches(0, 1)[0], _ga_micro_batches(3, 0)[1]]
    a, b, c = _objects(warmup=0), _objects(warmup=0), _objects(warmup=0)
    for reg, loss, t in micro:
        a.accumulate(torch.from_numpy(reg), torch.from_numpy(loss).requires_grad_(), t)
    pa = a.on_step_end(7)
    reg, loss, t = (np.concatenate(x) for x in zip(*micro))
    pb = b.on_step_end(7, reg, loss, t)
    for m in micro[:-1]:  # the last micro-batch may come with the call itself
        c.accumulate(*m)
    pc = c.on_step_end(7, *micro[-1])
    for cb in (a, b, c):
        assert cb.tracker.num_updates == 1 and cb.last_step == 7 and not cb._buffer
    np.testing.assert_array_equal(a.tracker.s1, b.tracker.s1)
    np.testing.assert_array_equal(c.tracker.s1, b.tracker.s1)
    assert pa.tolist() == pb.tolist() == pc.tolist()
    assert a.sampler.consumed == c.sampler.consumed == 3 and b.sampler.consumed == 1  # one per micro-batch


def test_on_step_end_with_nothing_buffered_is_an_update_without_samples():
    cb = _objects(warmup=0)
    probs = cb.on_step_end(1)
    assert cb.tracker.num_updates == 1 and cb.tracker.counts().sum() == 0
    np.testing.assert_array_equal(probs, cb.policy.prior)


def test_accumulation_logs_once_at_the_optimizer_step():
    acc = _Recorder()
    cb = _objects(acc)
    for step in (1, 2):  # two micro-batches per optimizer step, 1-based like a diffusers global_step
        for reg, loss, t in _ga_micro_batches(0, step):
            cb.accumulate(reg, loss, t)
        cb.on_step_end(step)
    assert [s for s, _ in acc.logged] == [1, 2]
    assert cb.tracker.num_updates == 2 and cb.history_steps == [1, 2]


def test_accumulate_refuses_inconsistent_input():
    cb = _objects()
    with pytest.raises(ValueError, match="region_ids has 2 entries but losses has 3"):
        cb.accumulate(np.array([0, 1]), np.array([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="region_ids and losses together"):
        cb.on_step_end(0, np.array([0, 1]))
    cb.accumulate(np.array([0, 1]), np.array([1.0, 1.0]), np.array([5, 6]))
    cb.accumulate(np.array([0, 1]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="some micro-batches came with timesteps and some without"):
        cb.on_step_end(0)


def test_save_load_state_continues_identical_stream(two_process_run):
    (r0, r1), out = two_process_run
    for r in (r0, r1):
        tail = r["log"][STEPS // 2:]
        assert [x["idx"] for x in tail] == [x["idx"] for x in r["resumed"]]
        assert [x["probs"] for x in tail] == [x["probs"] for x in r["resumed"]]
    files = os.listdir(out / "ckpt")
    assert "aria_state.safetensors" in files and "aria_state.json" in files and "aria_allocation.png" in files


def test_state_dict_loads_with_weights_only(tmp_path):
    cb = _objects()
    _run_steps(cb, range(5), 0, 1, [])
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    cb2 = _objects()
    cb2.load_state_dict(state)
    assert np.array_equal(cb2.sampler.counters, cb.sampler.counters)
    assert np.array_equal(cb2.policy.probabilities, cb.policy.probabilities)


class _Recorder:
    """The parts of an Accelerator the callback uses in one process: logging and the checkpoint hooks."""

    is_main_process = True
    num_processes = 1

    def __init__(self):
        self.logged = []

    def log(self, values, step=None):
        self.logged.append((step, values))

    def register_save_state_pre_hook(self, hook):
        self.save_hook = hook

    def register_load_state_pre_hook(self, hook):
        self.load_hook = hook


def test_logging_summary_report_and_nonfinite(tmp_path):
    acc = _Recorder()
    cb = _objects(acc)
    _run_steps(cb, range(4), 0, 1, [])
    step, values = acc.logged[-1]
    assert step == 3
    for key in ("aria/entropy", "aria/effective_regions", "aria/kl_to_prompt_share", "aria/prob/region_004",
                "aria/estimate/region_004", "aria/draw_share/region_004"):
        assert key in values
    assert values["aria/effective_regions"] == pytest.approx(np.exp(values["aria/entropy"]))
    # region 4 is 40% harder with ~10% noise: the credible score counts a real spread and moves toward it
    assert values["aria/real_spread"] > 0.05
    assert cb.sampler.probabilities[4] > cb.policy.prior[4]
    cb.on_step_end(4, np.array([0, 1, 2]), np.array([np.nan, np.inf, 1.0]), np.array([1, 2, 3]))
    assert cb.tracker.num_nonfinite == 2 and acc.logged[-1][1]["aria/nonfinite_total"] == 2
    paths = cb.write_report(str(tmp_path))
    report = json.load(open(paths["json"]))
    assert len(report["regions"]) == K and report["policy"] == "aria"
    assert "| region |" in open(paths["markdown"]).read()
    assert os.path.getsize(paths["plot"]) > 1000
    # the accelerate save hook writes the state beside a checkpoint
    acc.save_hook([], [], str(tmp_path / "ckpt"))
    cb2 = _objects(acc)
    acc.load_hook([], str(tmp_path / "ckpt"))
    assert np.array_equal(cb2.tracker.s1, cb.tracker.s1)


def test_mask_limits_tracker_to_swapped_samples():
    cb = _objects(warmup=0)
    reg = np.array([0, 1, 2, 3])
    cb.on_step_end(0, reg, np.array([1.0, 1.0, 1.0, 1.0]), mask=np.array([False, True, True, True]))  # baseline
    cb.on_step_end(1, reg, np.array([5.0, 1.0, 1.0, 1.0]), mask=np.array([False, True, True, True]))
    assert cb.tracker.counts()[0] == 0 and cb.tracker.counts()[1] == 1


def test_mismatched_components_raise():
    sampler = AdaptiveRegionSampler(REGION_IDS)
    with pytest.raises(ValueError, match="same number of regions"):
        ARIACallback(None, sampler, DiscrepancyTracker(K + 1), make_policy("rc", SIZES))


@pytest.mark.parametrize("num_regions", [6, 40])
def test_allocation_plot_names_regions_and_says_why_probability_is_not_the_estimate(tmp_path, num_regions):
    from PIL import Image

    ids = np.arange(num_regions * 5) % num_regions
    sampler = AdaptiveRegionSampler(ids, seed=0)
    tracker = DiscrepancyTracker(num_regions, half_life=50)
    policy = ARIAAllocation(sampler.sizes, warmup_steps=1, damping=0.5, refresh_every=1)
    names = [f"topic{j} (90%)" for j in range(num_regions)]
    cb = ARIACallback(None, sampler, tracker, policy, region_names=names)
    rng = np.random.default_rng(0)
    for step in range(1, 30):
        reg = rng.integers(0, num_regions, 64)
        cb.on_step_end(step, reg, 1.0 + 0.5 * (reg == 1) + 0.05 * rng.standard_normal(64))
    from diffusers_aria.reporting import plot_caption

    caption = plot_caption(cb)
    assert "Probability is not the estimate" in caption and "exp(credible excess / 0.1)" in caption
    assert "4x its prior" in caption and "50% of the way" in caption
    cb.policy.refresh_every = 8
    assert "recomputed every 8 updates and moves 100% of the way each time" in plot_caption(cb)
    path = cb.plot(str(tmp_path / "aria_allocation.png"))
    width, height = Image.open(path).size
    assert width >= 1200 and height >= 600
