"""FID and CLIP score of the generated images, from well-kept libraries, loaded only when used.

- FID: torchmetrics' `FrechetInceptionDistance`. Its feature extractor is injectable (`fid_extractor`):
  `inception` is torchmetrics' InceptionV3 (2048 features; it needs `torch-fidelity`, the `compare` extra,
  and downloads the Inception weights once), `clip` the image tower of the CLIP model (`CLIPImageFeatures`),
  and `package.module:factory` any `torch.nn.Module` a factory returns, taking uint8 images [N, 3, H, W].
- CLIP score: torchmetrics' `CLIPScore` (100 x the cosine of image and prompt embeddings, floored at 0) with a
  transformers `CLIPModel` and `CLIPProcessor` loaded from a Hub id or a local folder (`load_clip`).

Images are read as RGB, centre-cropped to a square and resized to one size, so that reference photos of any
shape and the generated images enter the same extractor alike.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

import torch

from ..utils.errors import UserError

FID_FEATURES_HELP = ("inception (torchmetrics' InceptionV3, needs torch-fidelity), clip (the CLIP model's image "
                     "tower), or package.module:factory (a torch.nn.Module taking uint8 images [N, 3, H, W])")


def check_fid_features(kind: str) -> None:
    """A one-line error for an extractor that cannot be made, before any heavy work."""
    if kind in ("inception", "clip"):
        if kind == "inception" and importlib.util.find_spec("torch_fidelity") is None:
            raise UserError("--fid_features inception needs torch-fidelity (torchmetrics' InceptionV3): pip install "
                            "'diffusers-aria[compare]', or pass --fid_features clip")
        return
    module, _, attr = kind.partition(":")
    if not module or not attr:
        raise UserError(f"--fid_features {kind!r} is not valid; use {FID_FEATURES_HELP}")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(f"--fid_features {kind!r}: module {module!r} cannot be imported; use {FID_FEATURES_HELP}")


def load_clip(name_or_path: str):
    """(CLIPModel, CLIPProcessor) from a Hub id or a folder written by `save_pretrained`, in eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(name_or_path).eval()
    return model, CLIPProcessor.from_pretrained(name_or_path)


def _clip_features(output):
    """`get_image_features` returns a tensor in older transformers and an output object in newer ones."""
    return output if hasattr(output, "shape") else output.pooler_output


class TensorFeatures(torch.nn.Module):
    """A `CLIPModel` whose `get_image_features` / `get_text_features` return tensors: transformers 5 returns
    output objects (the projected embedding in `pooler_output`), which torchmetrics' CLIPScore does not unwrap."""

    def __init__(self, model) -> None:
        super().__init__()
        self.clip, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _clip_features(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _clip_features(self.clip.get_text_features(*args, **kwargs))


class CLIPImageFeatures(torch.nn.Module):
    """FID features from a CLIP image tower: uint8 images [N, 3, H, W] -> image embeddings [N, D]."""

    def __init__(self, model, processor) -> None:
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.num_features = int(model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images):
        arrays = [img.permute(1, 2, 0).cpu().numpy() for img in images]
        pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
        device = next(self.model.parameters()).device
        return _clip_features(self.model.get_image_features(pixel_values=pixels.to(device))).float()


def fid_extractor(kind: str, clip_model: str | None = None, clip=None):
    """The `feature` argument of torchmetrics' FID: 2048 (its InceptionV3) or a module (see the module doc).

    `clip`: an already loaded (model, processor) pair for `clip`, to load the CLIP model once.
    """
    check_fid_features(kind)
    if kind == "inception":
        return 2048
    if kind == "clip":
        model, processor = clip or load_clip(clip_model)
        return CLIPImageFeatures(model, processor)
    module, _, attr = kind.partition(":")
    extractor = getattr(importlib.import_module(module), attr)()
    if not isinstance(extractor, torch.nn.Module):
        raise UserError(f"--fid_features {kind!r} returned a {type(extractor).__name__}, not a torch.nn.Module")
    return extractor


def load_images(paths: Sequence[str], size: int):
    """uint8 tensor [N, 3, size, size]: each image RGB, centre-cropped to a square, resized (bicubic)."""
    import numpy as np
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if s != size:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            out.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class Scorer:
    """FID (against the reference images of each split) and CLIP score, with the models loaded once."""

    def __init__(self, fid_features: str | None, clip_model: str, image_size: int, device=None,
                 batch_size: int = 64) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.size, self.batch_size = image_size, batch_size
        clip = load_clip(clip_model)
        self.clip_score = CLIPScore(model_name_or_path=lambda: (TensorFeatures(clip[0]), clip[1])).to(self.device)
        self.feature = fid_extractor(fid_features, clip_model, clip=clip) if fid_features else None
        self._fid = {}

    def _batches(self, paths: Sequence[str]):
        for start in range(0, len(paths), self.batch_size):
            yield start, load_images(paths[start:start + self.batch_size], self.size).to(self.device)

    def set_reference(self, split: str, paths: Sequence[str]) -> None:
        """The real images of a split (their features are kept for every model's FID)."""
        if self.feature is None:
            return
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=self.feature, reset_real_features=False, normalize=False).to(self.device)
        for _, batch in self._batches(paths):
            fid.update(batch, real=True)
        self._fid[split] = fid

    def fid(self, split: str, paths: Sequence[str]) -> float | None:
        """FID of the generated images `paths` against the split's reference images (None below 2 images)."""
        fid = self._fid.get(split)
        if fid is None or len(paths) < 2 or int(fid.real_features_num_samples) < 2:
            return None
        fid.reset()  # the fake features only: the real ones stay (reset_real_features=False)
        for _, batch in self._batches(paths):
            fid.update(batch, real=False)
        return float(fid.compute())

    def clip(self, paths: Sequence[str], prompts: Sequence[str]) -> float | None:
        if not paths:
            return None
        self.clip_score.reset()
        for start, batch in self._batches(paths):
            self.clip_score.update(batch, list(prompts[start:start + len(batch)]))
        return float(self.clip_score.compute())


__all__ = ["CLIPImageFeatures", "FID_FEATURES_HELP", "Scorer", "check_fid_features", "fid_extractor", "load_clip",
           "load_images"]
