"""Synthetic, prompt-dependent clean latents: what the tiny teacher is trained to generate.

Every prompt's sentence embedding is softly assigned (sharp softmax over cosine similarity) to a set of anchor
prompts, each anchor owning its own random ``C x L x L`` pattern, and the prompt's clean latent is the resulting
mixture of patterns. Similar prompts thus get similar latents and different subject matter gets different
latents. ``make_tiny_teacher`` trains on them and saves the anchors (read back by ``LatentRenderer``); the
quality benchmarks (``benchmarks/_miniature.py``) build their miniature worlds from them too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .minilm import sentence_embeddings

__all__ = [
    "DEFAULT_ANCHOR_TEMPERATURE",
    "DEFAULT_NUM_ANCHORS",
    "synthetic_latents_and_anchors",
    "teacher_latents",
]

#: Number of anchors of the tiny teacher (fewer when there are fewer prompts).
DEFAULT_NUM_ANCHORS = 16
#: Softmax temperature of the assignment of prompts to anchors (cosine similarity / temperature).
DEFAULT_ANCHOR_TEMPERATURE = 0.05


def _anchor_patterns(num: int, channels: int, size: int, gen: torch.Generator, unit_variance: bool = True
                     ) -> torch.Tensor:
    """Random white patterns, one per anchor (each scaled to unit variance when ``unit_variance``).

    White, not smooth: a smooth pattern can be told apart from the diffusion noise without the prompt, and
    a UNet trained on such latents learns to ignore its text. A white pattern can only be recovered at
    small t by knowing which prompt (anchor) it belongs to.
    """
    patterns = torch.randn((num, channels, size, size), generator=gen)
    if not unit_variance:
        return patterns
    return patterns / patterns.flatten(1).std(1).view(-1, 1, 1, 1)


def synthetic_latents_and_anchors(
    sentence_emb: torch.Tensor,
    channels: int,
    size: int,
    gen: torch.Generator,
    num_anchors: int = DEFAULT_NUM_ANCHORS,
    temperature: float = DEFAULT_ANCHOR_TEMPERATURE,
    unit_patterns: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean latent per prompt, anchor prompt indices, anchor patterns).

    A prompt's latent is the sharp softmax mixture of the anchor patterns, by embedding similarity, scaled to
    unit variance.

    Args:
        sentence_emb: ``[N, D]`` L2-normalised sentence embeddings, one per prompt.
        channels: Latent channels ``C``.
        size: Latent side ``L``.
        gen: Generator of the anchor choice (first) and of the patterns (second).
        num_anchors: Anchors drawn among the prompts (``min(num_anchors, N)``).
        temperature: Softmax temperature of the assignment; small is sharp.
        unit_patterns: Scale every anchor pattern to unit variance before mixing (the tiny teacher); the
            quality benchmarks mix the raw ``N(0, 1)`` draws.

    Returns:
        Latents ``[N, C, L, L]``, anchor indices ``[K]`` into the prompts, patterns ``[K, C, L, L]``.
    """
    n = sentence_emb.shape[0]
    num_anchors = min(num_anchors, n)
    anchor_idx = torch.randperm(n, generator=gen)[:num_anchors]
    anchors = sentence_emb[anchor_idx]
    weights = torch.softmax(sentence_emb @ anchors.T / temperature, dim=-1)
    patterns = _anchor_patterns(num_anchors, channels, size, gen, unit_variance=unit_patterns)
    latents = torch.einsum("nk,kchw->nchw", weights, patterns)
    return latents / latents.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1), anchor_idx, patterns


def teacher_latents(text_encoder, tokenizer, prompts: Sequence[str], channels: int, size: int,
                    gen: torch.Generator | int) -> torch.Tensor:
    """The synthetic clean latents the teacher is trained on (and its sensitivity is measured with).

    `gen` is the build's generator (or a seed: the same latents as a build with that seed).
    """
    if isinstance(gen, int):
        gen = torch.Generator().manual_seed(gen)
    emb = sentence_embeddings(text_encoder, tokenizer, list(prompts))
    return synthetic_latents_and_anchors(emb, channels, size, gen)[0]
