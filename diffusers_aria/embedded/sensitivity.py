"""The text-sensitivity metric: how strongly a UNet's noise prediction depends on its prompt.

:func:`text_sensitivity` swaps the prompt of a shared noisy input and measures how much the predicted noise
changes, relative to its size. The tiny teacher reports it before and after training (``make_tiny_teacher``);
it works on any ``UNet2DConditionModel`` with a text encoder and tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .minilm import check_prompts, encode_prompts

__all__ = ["DEFAULT_SENSITIVITY_PAIRS", "DEFAULT_SENSITIVITY_TIMESTEPS", "text_sensitivity"]

#: Timesteps at which the tiny teacher's report measures the text sensitivity.
DEFAULT_SENSITIVITY_TIMESTEPS: tuple[int, ...] = (100, 400, 700, 900)
#: Number of random prompt pairs :func:`text_sensitivity` draws by default.
DEFAULT_SENSITIVITY_PAIRS = 64


@torch.no_grad()
def text_sensitivity(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    prompts: Sequence[str],
    timesteps: Sequence[int] = DEFAULT_SENSITIVITY_TIMESTEPS,
    num_pairs: int = DEFAULT_SENSITIVITY_PAIRS,
    seed: int = 0,
    clean_latents: torch.Tensor | None = None,
    batch_size: int = 32,
) -> dict[int, float]:
    """How strongly the UNet's noise prediction depends on its prompt.

    For each timestep ``t`` this returns ``sum ||eps(x_t, t, c1) - eps(x_t, t, c2)||^2 /
    sum ||eps(x_t, t, c1)||^2`` over ``num_pairs`` random pairs of *different* prompts ``(c1, c2)``
    with a shared input ``x_t``.  0 means the prompt is ignored; values around 1 mean swapping the
    prompt changes the prediction as much as its own size.

    Args:
        unet: A ``UNet2DConditionModel`` (or anything with the same call signature and config).
        text_encoder: Text encoder used via :func:`encode_prompts`.
        tokenizer: Matching tokenizer.
        scheduler: Diffusers scheduler with ``add_noise`` (used only with ``clean_latents``).
        prompts: At least two distinct prompts to draw pairs from.
        timesteps: Integer timesteps in ``[0, scheduler.config.num_train_timesteps)``.
        num_pairs: Number of random prompt pairs (shared across timesteps).
        seed: Seed of the pair choice and of the noise; the result is deterministic for a seed.
        clean_latents: Optional ``(len(prompts), C, H, W)`` clean latents. When given, ``x_t`` is
            ``scheduler.add_noise`` of the first prompt's latent; otherwise ``x_t ~ N(0, I)``.
        batch_size: Pairs per UNet call.

    Returns:
        ``{t: sensitivity}`` for every requested timestep.
    """
    prompts = check_prompts(prompts, minimum=2)
    if len(set(prompts)) < 2:
        raise ValueError("text_sensitivity needs at least two different prompts")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    num_train = int(scheduler.config.num_train_timesteps)
    timesteps = [int(t) for t in timesteps]
    bad = [t for t in timesteps if not 0 <= t < num_train]
    if bad or not timesteps:
        raise ValueError(f"timesteps must be a non-empty list of ints in [0, {num_train}), got {timesteps}")
    channels = int(unet.config.in_channels)
    size = int(unet.config.sample_size)
    if clean_latents is not None and (
        clean_latents.ndim != 4 or clean_latents.shape[0] != len(prompts)
    ):
        raise ValueError(
            f"clean_latents must have shape (len(prompts)={len(prompts)}, C, H, W), got "
            f"{tuple(clean_latents.shape)}"
        )

    gen = torch.Generator().manual_seed(seed)
    n = len(prompts)
    first = torch.randint(0, n, (num_pairs,), generator=gen)
    second = torch.randint(0, n, (num_pairs,), generator=gen)
    # Re-draw partners until every pair holds two different prompt strings.
    for i in range(num_pairs):
        while prompts[int(second[i])] == prompts[int(first[i])]:
            second[i] = torch.randint(0, n, (1,), generator=gen)
    used = sorted(set(first.tolist()) | set(second.tolist()))
    index = {p: k for k, p in enumerate(used)}
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    embeds = encode_prompts(text_encoder, tokenizer, [prompts[i] for i in used]).to(device, dtype)
    emb1 = embeds[torch.tensor([index[int(i)] for i in first])]
    emb2 = embeds[torch.tensor([index[int(i)] for i in second])]

    was_training = unet.training
    unet.eval()
    result: dict[int, float] = {}
    try:
        for t in timesteps:
            noise = torch.randn((num_pairs, channels, size, size), generator=gen)
            if clean_latents is None:
                x_t = noise
            else:
                x0 = clean_latents[first].float().cpu()
                x_t = scheduler.add_noise(x0, noise, torch.full((num_pairs,), t, dtype=torch.long))
            x_t = x_t.to(device, dtype)
            diff = 0.0
            norm = 0.0
            for s in range(0, num_pairs, batch_size):
                xb = x_t[s : s + batch_size]
                tb = torch.full((xb.shape[0],), t, device=device, dtype=torch.long)
                # One call for both prompts so both predictions see the identical batch.
                out = unet(torch.cat([xb, xb]), torch.cat([tb, tb]), torch.cat([emb1[s : s + batch_size],
                           emb2[s : s + batch_size]])).sample.float()
                eps1, eps2 = out.chunk(2)
                diff += float(((eps1 - eps2) ** 2).sum())
                norm += float((eps1**2).sum())
            result[t] = diff / max(norm, 1e-12)
    finally:
        unet.train(was_training)
    return result
