"""data.py: the step-indexed paired stream."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffusers_aria.rng import step_generator
from diffusers_aria.training.data import (
    ImageCaptionDataset,
    LatentCaptionDataset,
    StepBatchSampler,
    collate,
    split_key,
)


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
    first = next(iter(a))
    assert [i for i, _ in first] == StepBatchSampler(10, 3, seed=1).indices(4).tolist()
    assert [e for _, e in first] == [1, 1, 1]  # positions 12..14 of a 10-row dataset: epoch 1
    plain = StepBatchSampler(10, 3, seed=1, start_step=4, with_epoch=False)
    assert next(iter(plain)) == [i for i, _ in first]
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


def test_latent_dataset_takes_index_epoch_pairs():
    ds = LatentCaptionDataset(torch.randn(3, 4, 2, 2), ["a", "b", "c"], np.array([0, 2, 1]))
    assert ds[(1, 5)]["caption"] == "b" and torch.equal(ds[(1, 5)]["latents"], ds[1]["latents"])
    assert split_key(np.int64(2)) == (2, 0) and split_key((3, 1)) == (3, 1)
    with pytest.raises(TypeError, match="index, epoch"):
        split_key((1, 2, 3))
    with pytest.raises(TypeError, match="row index"):
        split_key("0")


def _image_dataset(n: int = 6, captions=None, **kwargs) -> ImageCaptionDataset:
    """n random-noise 24x40 images (wider than tall, so a 16px crop has 12 horizontal positions)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)) for _ in range(n)]
    captions = captions or [f"caption {i}" for i in range(n)]
    ds = datasets.Dataset.from_dict({"image": images, "text": captions})
    kwargs = {"center_crop": False, "random_flip": True, "seed": 7, **kwargs}
    return ImageCaptionDataset(ds, "image", "text", resolution=16, **kwargs)


def test_crop_and_flip_change_with_the_epoch_and_are_deterministic():
    ds, again = _image_dataset(), _image_dataset()
    changed = 0
    for i in range(len(ds)):
        e0, e1 = ds[(i, 0)]["pixel_values"], ds[(i, 1)]["pixel_values"]
        assert e0.shape == (3, 16, 16)
        changed += not torch.equal(e0, e1)
        assert torch.equal(e1, again[(i, 1)]["pixel_values"])  # a new dataset object draws the same
    assert changed > 0
    assert torch.equal(ds[2]["pixel_values"], ds[(2, 0)]["pixel_values"])  # a plain index is epoch 0
    flips = _image_dataset(center_crop=True)
    pairs = [(flips[(i, 0)]["pixel_values"], flips[(i, e)]["pixel_values"]) for i in range(6) for e in (1, 2, 3)]
    assert any(torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in pairs)  # flipped in some epochs
    centre = _image_dataset(center_crop=True, random_flip=False)
    assert torch.equal(centre[(0, 0)]["pixel_values"], centre[(0, 3)]["pixel_values"])  # nothing random


def test_time_ids_record_the_original_size_and_where_the_crop_lies():
    """SDXL's micro-conditioning per row: 24x40 images resized to 16x27 (shorter side 16), cropped to 16x16."""
    centre = _image_dataset(center_crop=True, random_flip=False)
    assert centre[0]["time_ids"].tolist() == [24, 40, 0, 5, 16, 16]  # (27 - 16) // 2 = 5
    ds = _image_dataset()  # random crops and flips
    seen = set()
    for i in range(len(ds)):
        for epoch in range(4):
            row = ds[(i, epoch)]
            h, w, top, left, th, tw = row["time_ids"].tolist()
            assert (h, w, top, th, tw) == (24, 40, 0, 16, 16) and 0 <= left <= 11
            seen.add(left)
    assert len(seen) > 2
    # a flipped crop lies mirrored: the same epoch's unflipped crop at `left` shows at 27 - 16 - left
    no_flip = _image_dataset(random_flip=False)
    mirrored = [(no_flip[(i, e)]["time_ids"][3], ds[(i, e)]["time_ids"][3]) for i in range(6) for e in range(4)]
    assert any(b == 11 - a for a, b in mirrored if a != b) and all(b in (a, 11 - a) for a, b in mirrored)
    batch = collate([ds[0], ds[1]])
    assert batch["time_ids"].shape == (2, 6)


def test_a_list_caption_is_drawn_per_epoch():
    caps = [["a cat", "a kitten", "a small cat"], ["one"], []]  # an Arrow column is all lists or all strings
    ds = _image_dataset(3, captions=caps)
    drawn = [ds[(0, e)]["caption"] for e in range(12)]
    assert set(drawn) == set(caps[0])
    assert drawn == [_image_dataset(3, captions=caps)[(0, e)]["caption"] for e in range(12)]
    assert [ds[(i, 5)]["caption"] for i in (1, 2)] == ["one", ""]
    assert ds.captions() == ["a cat", "one", ""]  # regions are assigned on the first entry


def test_dataloader_workers_see_the_same_batches():
    ds = _image_dataset(5, captions=[["x", "y"], ["p", "q"], ["z"], ["u", "v", "w"], ["s"]])

    def batches(num_workers: int) -> list[dict]:
        loader = DataLoader(ds, batch_sampler=StepBatchSampler(len(ds), 2, seed=3, start_step=1),
                            collate_fn=collate, num_workers=num_workers)
        return list(itertools.islice(loader, 6))  # 12 draws of 5 rows: three epochs

    serial, parallel = batches(0), batches(2)
    for a, b in zip(serial, parallel):
        assert a["caption"] == b["caption"] and torch.equal(a["index"], b["index"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    rows = torch.cat([b["index"] for b in serial]).tolist()
    assert sorted(rows[3:8]) == list(range(5))  # positions 5..9 are epoch 1: each row once


def test_image_interpolation_mode_picks_the_resize_filter():
    from PIL import Image

    kw = {"center_crop": True, "random_flip": False}
    by_mode = {m: _image_dataset(interpolation=m, **kw)[0]["pixel_values"] for m in ("nearest", "bilinear", "lanczos")}
    assert not torch.equal(by_mode["nearest"], by_mode["bilinear"])
    assert not torch.equal(by_mode["bilinear"], by_mode["lanczos"])
    # nearest keeps source pixel values: every output value is one of the image's own
    src = np.asarray(_image_dataset(**kw).ds[0]["image"].convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    assert np.isin(by_mode["nearest"].numpy().round(5), src.round(5)).all()
    assert _image_dataset(**kw).interpolation == "lanczos"  # diffusers' default
    assert Image.Resampling.LANCZOS  # the filter exists in this Pillow
    with pytest.raises(ValueError, match="image interpolation 'cubic' is not valid; choose one of nearest"):
        _image_dataset(interpolation="cubic")


class _FakePipeline:
    """What `load_or_generate_teacher_latents` uses of a StableDiffusionPipeline: unet, text_encoder, scheduler, call."""

    def __init__(self, weight: float = 1.0):
        from types import SimpleNamespace

        self.unet, self.text_encoder = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.unet.weight.fill_(weight)
        self.scheduler = SimpleNamespace(config={"num_train_timesteps": 1000, "_class_name": "DDPMScheduler"})
        self.calls = 0

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type, height, width):
        from types import SimpleNamespace

        self.calls += 1
        return SimpleNamespace(images=torch.randn(len(prompts), 4, 2, 2, generator=generator))


def test_teacher_latents_are_reused_only_with_every_setting_the_same(tmp_path):
    from diffusers_aria.training.data import StaleCacheError, load_or_generate_teacher_latents

    prompts, idx = ["a cat", "a dog", "a car"], np.array([0, 4, 9])
    kw = {"num_inference_steps": 15, "guidance_scale": 5.0, "height": 32, "width": 32, "seed": 0, "progress": False}
    cache = str(tmp_path / "teacher_latents")
    pipe = _FakePipeline()
    first = load_or_generate_teacher_latents(cache, pipe, prompts, idx, fingerprint={"pool": "p1"}, **kw)
    again = load_or_generate_teacher_latents(cache, pipe, prompts, idx, fingerprint={"pool": "p1"}, **kw)
    assert pipe.calls == 1 and torch.equal(first, again)  # reused
    changes = [
        ({**kw, "num_inference_steps": 20}, prompts, {"pool": "p1"}, pipe, "num_inference_steps 15 (this run: 20)"),
        ({**kw, "seed": 1}, prompts, {"pool": "p1"}, pipe, "seed 0 (this run: 1)"),
        ({**kw, "guidance_scale": 3.0}, prompts, {"pool": "p1"}, pipe, "guidance_scale 5.0 (this run: 3.0)"),
        ({**kw, "height": 64, "width": 64}, prompts, {"pool": "p1"}, pipe, "height 32 (this run: 64)"),
        (kw, ["a cat", "a dog", "a boat"], {"pool": "p1"}, pipe, "prompts '"),
        (kw, prompts, {"pool": "p2"}, pipe, "pool 'p1' (this run: 'p2')"),
        (kw, prompts, {"pool": "p1"}, _FakePipeline(weight=2.0), "teacher_unet '"),
    ]
    for args, ps, fp, other, named in changes:
        with pytest.raises(StaleCacheError, match="were made with other settings than this run's: .*"
                                                  + named.replace("(", r"\(").replace(")", r"\)")):
            load_or_generate_teacher_latents(cache, other, ps, idx, fingerprint=fp, **args)
    assert pipe.calls == 1
    # asked to overwrite: made again with the new settings, then reused with them
    new = load_or_generate_teacher_latents(cache, pipe, prompts, idx, fingerprint={"pool": "p1"}, overwrite=True,
                                           **{**kw, "seed": 1})
    assert pipe.calls == 2 and not torch.equal(new, first)
    load_or_generate_teacher_latents(cache, pipe, prompts, idx, fingerprint={"pool": "p1"}, **{**kw, "seed": 1})
    assert pipe.calls == 2


def test_teacher_latents_cache_of_an_earlier_version_or_damaged_is_made_again(tmp_path):
    import json

    from diffusers_aria.training.data import load_or_generate_teacher_latents

    cache = tmp_path / "teacher_latents"
    pipe = _FakePipeline()
    load_or_generate_teacher_latents(str(cache), pipe, ["a", "b"], np.array([0, 1]), progress=False)
    (cache / "teacher_latents.json").write_text(json.dumps({"meta": {"fingerprint": "old"}}))  # no settings
    load_or_generate_teacher_latents(str(cache), pipe, ["a", "b"], np.array([0, 1]), progress=False)
    assert pipe.calls == 2 and "settings" in json.loads((cache / "teacher_latents.json").read_text())
    (cache / "teacher_latents.safetensors").write_bytes(b"\x00" * 10)  # damaged
    out = load_or_generate_teacher_latents(str(cache), pipe, ["a", "b"], np.array([0, 1]), progress=False)
    assert pipe.calls == 3 and out.shape == (2, 4, 2, 2)
