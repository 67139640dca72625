"""Test-only helpers of the `minimal_*text_to_image*.py` assets (their lines marked `# test only`).

None of this is part of diffusers' scripts or of docs/add-to-your-script.md. It lets the tests compare a resumed
run with an uninterrupted one bit for bit (the noise of each micro-batch is re-seeded from its position), makes
ARIA move from the first steps (so that the rows drawn depend on what ARIA learned), and writes what each rank
trained on. The assets import it from their own folder (the tests put that folder on the path).
"""

from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    parser.add_argument("--aria_test_warmup", type=int, default=None,
                        help="test only: ARIA moves after this many updates (z-scores, damping 0.5, every update)")
    parser.add_argument("--aria_test_log_every", type=int, default=None,
                        help="test only: ARIACallback.log_every")


def after_block_1(args, aria, regions) -> None:
    """Right after block 1: a policy that moves on the first steps' noise, and the logging cadence."""
    if args.aria_test_warmup is not None:
        from diffusers_aria import ARIAAllocation

        aria.policy = ARIAAllocation(regions.sizes, warmup_steps=args.aria_test_warmup, score="zscore",
                                     damping=0.5, refresh_every=1)
    if args.aria_test_log_every is not None:
        aria.log_every = args.aria_test_log_every


def reseed(micro_step: int, process_index: int) -> None:
    """The noise and timesteps of a micro-batch from its position only (the stock scripts do not promise this
    across a resume: they restore the main process's random state only)."""
    import torch

    torch.manual_seed(1000 * micro_step + process_index)


def record(args, accelerator, aria, regions, trained: list) -> None:
    """trained_rank{i}.json: every micro-batch this rank trained on (step, regions, loss) and ARIA's whole state
    at the end (what a checkpoint would hold)."""
    from diffusers_aria.callback import flatten_state

    tensors, plain = flatten_state(aria.state_dict())
    state = {**plain, **{k: v.tolist() for k, v in tensors.items()}}
    path = os.path.join(args.output_dir, f"trained_rank{accelerator.process_index}.json")
    with open(path, "w") as fh:
        json.dump({"world": accelerator.num_processes, "trained": trained, "history_steps": aria.history_steps,
                   "tracker_updates": aria.tracker.num_updates, "probs": aria.sampler.probabilities.tolist(),
                   "sizes": regions.sizes.tolist(), "read_ahead": aria.sampler.read_ahead, "state": state}, fh)
