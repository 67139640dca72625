"""Drawing the tiny teacher's latents as pictures a person can read: each anchor a coloured glyph.

The tiny teacher's VAE is random, so its decoded images look like colour noise. Its latents, though, are
mixtures of a few anchor patterns (see :mod:`diffusers_aria.embedded.synthetic_latents`), saved beside the teacher in
``aria_anchors.safetensors``. :class:`LatentRenderer` draws a generated latent as the anchors it is made of
(opacity = least-squares weight), over a grey speckle showing the part no anchor explains. A good generation
for a prompt shows the glyph of the prompt's nearest anchor, crisp; an untrained student shows speckle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils.atomic import atomic_save

__all__ = ["ANCHORS_NAME", "LatentRenderer", "load_latent_renderer"]

#: Name of the anchors file (patterns + prompts) written into the teacher folder, read by LatentRenderer.
ANCHORS_NAME = "aria_anchors.safetensors"

# 16 distinct colours (no grey: grey is the speckle of the unexplained part) and 8 shapes; anchor k is
# drawn as shape k % 8 in colour k % 16.
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (23, 190, 207), (188, 189, 34), (0, 0, 128), (255, 200, 0), (0, 128, 96),
            (128, 0, 0), (75, 0, 130), (0, 0, 0), (255, 90, 160))
_SHAPES = ("disc", "square", "triangle", "diamond", "ring", "plus", "star", "hexagon")


def _shape_mask(shape: str, size: int):
    """A PIL "L" mask of `shape` centred in a `size` x `size` square (255 inside)."""
    from PIL import Image, ImageDraw

    big = size * 4  # drawn large, then downsampled: smooth edges
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    c, r = big / 2, big * 0.36
    if shape == "disc":
        d.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif shape == "square":
        d.rectangle((c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85), fill=255)
    elif shape == "triangle":
        d.polygon([(c, c - r), (c + r * 0.95, c + r * 0.75), (c - r * 0.95, c + r * 0.75)], fill=255)
    elif shape == "diamond":
        d.polygon([(c, c - r), (c + r, c), (c, c + r), (c - r, c)], fill=255)
    elif shape == "ring":
        d.ellipse((c - r, c - r, c + r, c + r), fill=255)
        d.ellipse((c - r * 0.55, c - r * 0.55, c + r * 0.55, c + r * 0.55), fill=0)
    elif shape == "plus":
        w = r * 0.32
        d.rectangle((c - w, c - r, c + w, c + r), fill=255)
        d.rectangle((c - r, c - w, c + r, c + w), fill=255)
    elif shape == "star":
        pts = [(c + (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi * i / 5),
                c - (r if i % 2 == 0 else r * 0.45) * math.cos(math.pi * i / 5)) for i in range(10)]
        d.polygon(pts, fill=255)
    else:  # hexagon
        d.polygon([(c + r * math.cos(math.pi * i / 3), c + r * math.sin(math.pi * i / 3)) for i in range(6)], fill=255)
    return im.resize((size, size), Image.Resampling.LANCZOS)


@dataclass
class LatentRenderer:
    """Draws the tiny teacher's latents as pictures a person can read.

    The teacher is trained to generate, for each prompt, a mixture of a few anchor patterns (white noise
    to the eye). The renderer finds that mixture by least squares on the anchor patterns and draws each
    anchor as its own glyph (shape and colour) with the anchor's weight as its opacity, over a grey speckle
    whose darkness is the part of the latent no anchor explains. Teacher and student agree when they show
    the same glyphs equally strongly.

    Attributes:
        patterns: The anchor patterns, ``[K, C, H, W]`` (the latent shape).
        anchor_prompts: The prompt each anchor stands for (``K`` strings).
        tile_size: Side of a rendered picture in pixels.
    """

    patterns: torch.Tensor
    anchor_prompts: list[str]
    tile_size: int = 128

    def __post_init__(self) -> None:
        self.patterns = torch.as_tensor(self.patterns, dtype=torch.float32)
        if self.patterns.ndim != 4 or self.patterns.shape[0] != len(self.anchor_prompts):
            raise ValueError(f"patterns must be [K, C, H, W] with K = {len(self.anchor_prompts)} anchor prompts, "
                             f"got shape {tuple(self.patterns.shape)}")
        self._pinv = torch.linalg.pinv(self.patterns.flatten(1).double())

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_prompts)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``aria_anchors.safetensors`` (patterns; the prompts in its metadata) into ``folder``."""
        from safetensors.torch import save_file

        path = Path(folder) / ANCHORS_NAME
        atomic_save(path, lambda tmp: save_file({"patterns": self.patterns.contiguous()}, tmp, metadata={
            "anchor_prompts": json.dumps(self.anchor_prompts), "format": "1"}))
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], tile_size: int = 128) -> LatentRenderer:
        """Load the renderer of a tiny-teacher folder (``FileNotFoundError`` when it has no anchors file)."""
        from safetensors import safe_open

        path = Path(folder) / ANCHORS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {ANCHORS_NAME}: it is not a tiny teacher made by "
                                    "diffusers-aria (or one made before the anchors were saved: rerun "
                                    "make-tiny-teacher, which adds them)")
        with safe_open(str(path), framework="pt") as fh:
            prompts = json.loads(fh.metadata()["anchor_prompts"])
            patterns = fh.get_tensor("patterns")
        return cls(patterns, prompts, tile_size=tile_size)

    def _check(self, latents: torch.Tensor) -> torch.Tensor:
        latents = torch.as_tensor(latents).detach().float().cpu()
        if latents.ndim == 3:
            latents = latents[None]
        if tuple(latents.shape[1:]) != tuple(self.patterns.shape[1:]):
            raise ValueError(f"latents of shape {tuple(latents.shape[1:])} do not match this teacher's anchors "
                             f"{tuple(self.patterns.shape[1:])}")
        return latents

    def coefficients(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights ``[N, K]``, unexplained fraction ``[N]``) of latents ``[N, C, H, W]``.

        The weights are the least-squares mixture of the anchor patterns (a pure anchor is 1, an even mix
        of two about 0.71 each); the unexplained fraction is the residual's share of the latent's energy.
        """
        z = self._check(latents).flatten(1).double()
        coef = z @ self._pinv
        resid = z - coef @ self.patterns.flatten(1).double()
        frac = (resid.pow(2).sum(1) / z.pow(2).sum(1).clamp_min(1e-12)).clamp(0, 1)
        return coef.float(), frac.float()

    def glyph(self, anchor: int, size: int | None = None, opacity: float = 1.0):
        """Anchor ``anchor``'s glyph on white, as an RGB PIL image."""
        from PIL import Image

        size = size or self.tile_size
        colour = Image.new("RGB", (size, size), _PALETTE[anchor % len(_PALETTE)])
        mask = _shape_mask(_SHAPES[anchor % len(_SHAPES)], size).point(lambda v: int(v * opacity))
        return Image.composite(colour, Image.new("RGB", (size, size), (255, 255, 255)), mask)

    def render(self, latents: torch.Tensor) -> list:
        """One RGB PIL picture (``tile_size`` square) per latent."""
        import numpy as np
        from PIL import Image

        latents = self._check(latents)
        coef, _ = self.coefficients(latents)
        resid = latents - torch.einsum("nk,kchw->nchw", coef, self.patterns)
        size = self.tile_size
        masks = [np.asarray(_shape_mask(_SHAPES[k % len(_SHAPES)], size), dtype=np.float32) / 255.0
                 for k in range(min(self.num_anchors, len(_SHAPES)))]
        out = []
        for i in range(latents.shape[0]):
            scale = latents[i].std().clamp_min(1e-6)
            speckle = (resid[i].pow(2).mean(0).sqrt() / scale).numpy()  # [H, W], ~1 where nothing is explained
            speckle = np.asarray(Image.fromarray(speckle.astype(np.float32), mode="F").resize(
                (size, size), Image.Resampling.NEAREST))
            canvas = np.ones((size, size, 3), np.float32) * (1.0 - np.clip(0.45 * speckle, 0, 0.7))[..., None]
            weights = coef[i].clamp(0, 1).numpy()
            for k in np.argsort(weights):  # strongest last, on top
                if weights[k] < 0.05:
                    continue
                alpha = (weights[k] * masks[k % len(_SHAPES)])[..., None]
                colour = np.asarray(_PALETTE[k % len(_PALETTE)], np.float32) / 255.0
                canvas = canvas * (1 - alpha) + colour * alpha
            out.append(Image.fromarray((canvas * 255).round().astype(np.uint8), mode="RGB"))
        return out

    def _top(self, coef: torch.Tensor, top: int, min_weight: float) -> list[list[int]]:
        return [[int(k) for k in torch.argsort(c, descending=True)[:top] if float(c[k]) >= min_weight] for c in coef]

    def describe(self, latents: torch.Tensor, top: int = 2) -> list[str]:
        """A two-line caption per latent: its strongest anchors with their weights; the unexplained share."""
        coef, frac = self.coefficients(latents)
        captions = []
        for c, f, best in zip(coef, frac, self._top(coef, top, 0.05)):
            parts = [f"#{k} {float(c[k]):.2f}" for k in best]
            captions.append("  ".join(parts or ["no anchor"]) + f"\nunexplained {float(f):.0%}")
        return captions

    def legend(self, latents: torch.Tensor, top: int = 2, min_weight: float = 0.15,
               max_chars: int = 40) -> list[tuple[Any, str]]:
        """(glyph, "#k anchor prompt") for the anchors among some latent's ``top`` with ``min_weight`` or more."""
        coef, _ = self.coefficients(latents)
        used = sorted({k for best in self._top(coef, top, min_weight) for k in best})
        entries = []
        for k in used:
            text = self.anchor_prompts[k]
            text = text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."
            entries.append((self.glyph(k, 24), f"#{k} {text}"))
        return entries


def load_latent_renderer(name_or_path: str | os.PathLike[str] | None, tile_size: int = 128) -> LatentRenderer | None:
    """The :class:`LatentRenderer` of a tiny-teacher folder, or ``None`` for any other teacher."""
    if name_or_path is None or not (Path(name_or_path) / ANCHORS_NAME).is_file():
        return None
    return LatentRenderer.from_pretrained(name_or_path, tile_size=tile_size)
