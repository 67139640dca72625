"""data.py: the step-indexed paired stream."""

import numpy as np
import pytest
import torch

from diffusers_aria.data import LatentCaptionDataset, StepBatchSampler, collate, step_generator


def test_each_epoch_is_a_permutation_split_disjointly_across_ranks():
    n, b, world = 12, 2, 3
    ranks = [StepBatchSampler(n, b, seed=5, num_replicas=world, rank=r) for r in range(world)]
    steps_per_epoch = n // (b * world)
    for epoch in range(3):
        rows = [i for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
                for r in ranks for i in r.indices(s)]
        assert sorted(rows) == list(range(n))
    e0 = [i for s in range(steps_per_epoch) for r in ranks for i in r.indices(s)]
    e1 = [i for s in range(steps_per_epoch, 2 * steps_per_epoch) for r in ranks for i in r.indices(s)]
    assert e0 != e1  # a new order every epoch


def test_iteration_starts_at_the_resume_step_and_depends_on_seed():
    a = StepBatchSampler(10, 3, seed=1, start_step=4)
    assert next(iter(a)) == StepBatchSampler(10, 3, seed=1).indices(4).tolist()
    assert StepBatchSampler(10, 3, seed=2).indices(4).tolist() != a.indices(4).tolist()
    with pytest.raises(ValueError, match="empty"):
        StepBatchSampler(0, 2)


def test_step_generator_is_a_function_of_seed_step_rank():
    x = torch.rand(4, generator=step_generator(0, 7, 1))
    assert torch.equal(x, torch.rand(4, generator=step_generator(0, 7, 1)))
    assert not torch.equal(x, torch.rand(4, generator=step_generator(0, 7, 0)))


def test_latent_dataset_and_collate():
    ds = LatentCaptionDataset(torch.randn(3, 4, 2, 2), ["a", "b", "c"], np.array([0, 2, 1]))
    batch = collate([ds[2], ds[0]])
    assert batch["caption"] == ["c", "a"] and batch["region"].tolist() == [1, 0]
    assert batch["latents"].shape == (2, 4, 2, 2) and batch["index"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="same length"):
        LatentCaptionDataset(torch.randn(2, 4, 2, 2), ["a"], np.array([0, 1]))
