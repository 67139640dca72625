"""Tests for the embedded tiny offline teacher and the modules it is built from.

`tiny_teacher.py` (configs, training, building, caching), `minilm.py` (its text encoder), `sensitivity.py` (the
text-sensitivity metric), `synthetic_latents.py` (its training latents) and `latent_renderer.py` (drawing its
latents) are tested together: they share one small teacher build.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_aria.embedded import tiny_teacher  # noqa: E402
from diffusers_aria.embedded.latent_renderer import ANCHORS_NAME, LatentRenderer, load_latent_renderer  # noqa: E402
from diffusers_aria.embedded.minilm import (
    CROSS_ATTENTION_DIM,
    TOKEN_LENGTH,
    attention_mask,
    encode_prompts,
    load_minilm_text_encoder,
    pool_sentence_embeddings,
    sentence_embeddings,
)
from diffusers_aria.embedded.sensitivity import DEFAULT_SENSITIVITY_TIMESTEPS, text_sensitivity  # noqa: E402
from diffusers_aria.embedded.synthetic_latents import (
    DEFAULT_NUM_ANCHORS,
    synthetic_latents_and_anchors,
    teacher_latents,
)
from diffusers_aria.embedded.tiny_teacher import (
    REPORT_NAME,
    make_tiny_teacher,
    tiny_scheduler,
    tiny_unet_config,
)

PROMPTS = [
    "A fluffy red fox resting in a snowy meadow, wildlife photograph",
    "A steaming bowl of ramen on a wooden table, food photography",
    "A shiny red sports car parked on a city street",
    "A spiral galaxy glowing in deep space, telescope image",
    "A gothic cathedral with stained glass windows in the city center",
    "An old violin on a velvet cloth under a spotlight",
    "A coral reef with colorful fish in clear turquoise water",
    "Stained blood cells under a microscope on a glass slide",
]
RESOLUTION = 16
STEPS = 30


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "tiny"
    report = make_tiny_teacher(out, prompts=PROMPTS, train_steps=STEPS, seed=0, resolution=RESOLUTION,
                               progress=False)
    return out, report


@pytest.fixture(scope="module")
def minilm():
    return load_minilm_text_encoder()


def test_report_and_folder(teacher):
    out, report = teacher
    assert report.path == out and not report.cached
    assert report.train_steps == STEPS and report.seconds > 0
    assert set(report.sensitivity_before) == set(DEFAULT_SENSITIVITY_TIMESTEPS)
    assert set(report.sensitivity_after) == set(DEFAULT_SENSITIVITY_TIMESTEPS)
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["train_steps"] == STEPS
    assert saved["settings"]["resolution"] == RESOLUTION
    assert {int(k): v for k, v in saved["sensitivity_after"].items()} == report.sensitivity_after
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (out / sub).exists(), sub
    # No temporary siblings are left next to the output folder.
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_pipeline_loads_and_generates(teacher):
    from diffusers import StableDiffusionPipeline

    out, _ = teacher
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae_scale_factor == 2
    assert pipe.unet.config.sample_size == RESOLUTION // 2
    assert pipe.unet.config.cross_attention_dim == CROSS_ATTENTION_DIM
    assert pipe.tokenizer.model_max_length == TOKEN_LENGTH
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [PROMPTS[0], PROMPTS[3]],
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_encode_prompts_matches_pipeline(teacher):
    from diffusers import StableDiffusionPipeline

    out, _ = teacher
    pipe = StableDiffusionPipeline.from_pretrained(out)
    ours = encode_prompts(pipe.text_encoder, pipe.tokenizer, PROMPTS[:3])
    assert ours.shape == (3, TOKEN_LENGTH, CROSS_ATTENTION_DIM)
    theirs, _ = pipe.encode_prompt(PROMPTS[:3], "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)


def test_sentence_embeddings_pool_the_token_states_and_ignore_padding(minilm):
    text_encoder, tokenizer = minilm
    prompts = PROMPTS[:5] + ["fox"]  # the last one is nearly all padding
    emb = sentence_embeddings(text_encoder, tokenizer, prompts)
    assert emb.shape == (len(prompts), CROSS_ATTENTION_DIM)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(prompts)))
    # pooled batch by batch: the same rows in batches of 2
    torch.testing.assert_close(sentence_embeddings(text_encoder, tokenizer, prompts, batch_size=2), emb)
    # from token states already computed (the tiny teacher's one encoder pass): the same embeddings, bit for bit
    states = encode_prompts(text_encoder, tokenizer, prompts)
    mask = attention_mask(tokenizer, prompts)
    assert torch.equal(pool_sentence_embeddings(states, mask), emb)
    # the padding does not count: averaged over every position, the short prompt's embedding is another
    unmasked = pool_sentence_embeddings(states, torch.ones_like(mask))
    assert float(unmasked[-1] @ emb[-1]) < 0.99


def test_second_call_is_cached_and_force_retrains(teacher):
    out, report = teacher
    start = time.perf_counter()
    again = make_tiny_teacher(out, prompts=PROMPTS, train_steps=STEPS, seed=0, resolution=RESOLUTION,
                              progress=False)
    assert time.perf_counter() - start < 2.0
    assert again.cached
    assert again.sensitivity_after == report.sensitivity_after
    assert again.seconds == pytest.approx(report.seconds)

    before_mtime = (out / REPORT_NAME).stat().st_mtime_ns
    forced = make_tiny_teacher(out, prompts=PROMPTS, train_steps=STEPS, seed=0, resolution=RESOLUTION,
                               force=True, progress=False)
    assert not forced.cached
    assert (out / REPORT_NAME).stat().st_mtime_ns != before_mtime
    # Same seed and settings: the rebuild reproduces the measurement.
    for t, value in report.sensitivity_after.items():
        assert forced.sensitivity_after[t] == pytest.approx(value, rel=1e-3)


def test_changed_settings_rebuild(teacher, tmp_path):
    out, _ = teacher
    other = make_tiny_teacher(tmp_path / "t", prompts=PROMPTS[:4], train_steps=0, resolution=RESOLUTION,
                              progress=False)
    assert not other.cached and other.train_steps == 0
    # Untrained: before and after are the same measurement.
    assert other.sensitivity_after == other.sensitivity_before
    rebuilt = make_tiny_teacher(tmp_path / "t", prompts=PROMPTS[:4], train_steps=1, resolution=RESOLUTION,
                                progress=False)
    assert not rebuilt.cached and rebuilt.train_steps == 1


def test_report_sensitivity_is_a_real_measurement(teacher, minilm):
    """The stored 'after' numbers are reproduced by text_sensitivity on the saved UNet."""
    from diffusers import UNet2DConditionModel

    out, report = teacher
    text_encoder, tokenizer = minilm
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    prompts = list(dict.fromkeys(PROMPTS))
    latents = teacher_latents(text_encoder, tokenizer, prompts, unet.config.in_channels, unet.config.sample_size, 0)
    again = text_sensitivity(unet, text_encoder, tokenizer, tiny_scheduler(), prompts,
                             DEFAULT_SENSITIVITY_TIMESTEPS, seed=0, clean_latents=latents)
    for t, value in report.sensitivity_after.items():
        assert again[t] == pytest.approx(value, rel=1e-3, abs=1e-7)
    assert all(v > 0 for v in report.sensitivity_before.values())


def test_failure_leaves_no_folder(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = tiny_teacher._train_step

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in the middle of training")
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_teacher, "_train_step", flaky)
    out = tmp_path / "teacher"
    with pytest.raises(RuntimeError, match="boom"):
        make_tiny_teacher(out, prompts=PROMPTS[:4], train_steps=10, resolution=RESOLUTION, progress=False)
    assert calls["n"] == 3
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_force_keeps_previous_teacher(teacher, tmp_path, monkeypatch):
    out, report = teacher
    before = (out / REPORT_NAME).read_text()

    def fail_save(self, *args, **kwargs):
        raise OSError("disk full")

    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", fail_save)
    with pytest.raises(OSError, match="disk full"):
        make_tiny_teacher(out, prompts=PROMPTS, train_steps=0, resolution=RESOLUTION, force=True,
                          progress=False)
    assert (out / REPORT_NAME).read_text() == before
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no tiny teacher"):
        make_tiny_teacher(tmp_path, prompts=PROMPTS, train_steps=0, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"resolution": 30}, ValueError, "multiple of 4"),
        ({"train_steps": -1}, ValueError, "train_steps"),
        ({"prompts": ["same", "same"]}, ValueError, "two different prompts"),
        ({"prompts": "just one string"}, TypeError, "sequence of strings"),
    ],
)
def test_argument_validation(tmp_path, kwargs, error, match):
    args = {"prompts": PROMPTS, "train_steps": 0, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        make_tiny_teacher(tmp_path / "t", **args)
    assert not (tmp_path / "t").exists()


def test_text_sensitivity_zero_for_text_blind_unet(minilm):
    """A UNet that ignores its conditioning has sensitivity exactly 0; a text-driven one does not."""
    text_encoder, tokenizer = minilm
    config = tiny_unet_config(RESOLUTION)

    class Blind(torch.nn.Module):
        def __init__(self, use_text: bool):
            super().__init__()
            self.config = type("Cfg", (), {"in_channels": 4, "sample_size": config["sample_size"]})()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.use_text = use_text

        def forward(self, x, t, encoder_hidden_states):
            out = x * self.scale
            if self.use_text:
                out = out + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1) * 50
            return type("Out", (), {"sample": out})()

    scheduler = tiny_scheduler()
    blind = text_sensitivity(Blind(False), text_encoder, tokenizer, scheduler, PROMPTS, (100, 900), num_pairs=8)
    assert blind == {100: 0.0, 900: 0.0}
    seeing = text_sensitivity(Blind(True), text_encoder, tokenizer, scheduler, PROMPTS, (100,), num_pairs=8)
    assert seeing[100] > 1e-4
    with pytest.raises(ValueError, match="timesteps"):
        text_sensitivity(Blind(False), text_encoder, tokenizer, scheduler, PROMPTS, (1000,))


def test_anchors_are_saved_and_the_renderer_reads_them(teacher, tmp_path):
    """The teacher folder holds its anchors; the renderer finds an anchor's own pattern as weight 1."""
    out, _ = teacher
    renderer = load_latent_renderer(out)
    k = renderer.num_anchors
    assert k == min(DEFAULT_NUM_ANCHORS, len(PROMPTS)) and set(renderer.anchor_prompts) <= set(PROMPTS)
    assert tuple(renderer.patterns.shape) == (k, 4, RESOLUTION // 2, RESOLUTION // 2)
    coef, unexplained = renderer.coefficients(renderer.patterns)
    torch.testing.assert_close(coef, torch.eye(k), atol=1e-4, rtol=0)
    assert float(unexplained.max()) < 1e-4
    assert renderer.describe(renderer.patterns[2:3]) == ["#2 1.00\nunexplained 0%"]
    _, noise_share = renderer.coefficients(torch.randn(3, 4, RESOLUTION // 2, RESOLUTION // 2))
    assert float(noise_share.min()) > 0.5  # white noise is mostly not an anchor
    pictures = renderer.render(renderer.patterns[:2])
    assert [p.size for p in pictures] == [(128, 128)] * 2 and pictures[0].getpixel((64, 64)) != (255, 255, 255)
    [(glyph, text)] = renderer.legend(renderer.patterns[:1])  # the anchors a picture shows, named by their prompt
    assert glyph.size == (24, 24) and text.startswith("#0 ") and renderer.anchor_prompts[0].startswith(
        text[3:].removesuffix("..."))
    assert load_latent_renderer(tmp_path) is None  # any other teacher
    with pytest.raises(FileNotFoundError, match=ANCHORS_NAME):
        LatentRenderer.from_pretrained(tmp_path)


def test_the_teachers_training_latents_are_mixtures_of_its_anchors(teacher, minilm):
    """What the renderer draws is what the teacher learnt: its training latents are explained by the anchors."""
    out, _ = teacher
    text_encoder, tokenizer = minilm
    renderer = load_latent_renderer(out)
    latents = teacher_latents(text_encoder, tokenizer, list(dict.fromkeys(PROMPTS)), 4, RESOLUTION // 2, 0)
    _, unexplained = renderer.coefficients(latents)
    assert float(unexplained.max()) < 1e-4
    for i, prompt in enumerate(renderer.anchor_prompts):  # an anchor prompt's latent is mostly its own anchor
        coef, _ = renderer.coefficients(latents[PROMPTS.index(prompt)])
        assert int(coef.argmax()) == i


def test_a_cached_teacher_without_anchors_gets_them(teacher):
    out, _ = teacher
    before = load_latent_renderer(out)
    (out / ANCHORS_NAME).unlink()  # a teacher made before the anchors were saved
    again = make_tiny_teacher(out, prompts=PROMPTS, train_steps=STEPS, seed=0, resolution=RESOLUTION, progress=False)
    assert again.cached
    after = load_latent_renderer(out)
    assert after.anchor_prompts == before.anchor_prompts and torch.equal(after.patterns, before.patterns)


def test_synthetic_latents_are_unit_variance_mixtures_of_their_anchors():
    gen = torch.Generator().manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    latents, idx, patterns = synthetic_latents_and_anchors(emb, 4, 6, torch.Generator().manual_seed(0), num_anchors=5)
    assert latents.shape == (30, 4, 6, 6) and idx.shape == (5,) and patterns.shape == (5, 4, 6, 6)
    torch.testing.assert_close(latents.flatten(1).std(1), torch.ones(30))
    torch.testing.assert_close(patterns.flatten(1).std(1), torch.ones(5))  # the tiny teacher scales its anchors
    # the benchmarks' variant mixes the raw draws: the same anchors and weights, patterns not rescaled
    raw_latents, raw_idx, raw = synthetic_latents_and_anchors(emb, 4, 6, torch.Generator().manual_seed(0),
                                                              num_anchors=5, unit_patterns=False)
    assert torch.equal(raw_idx, idx)
    torch.testing.assert_close(raw / raw.flatten(1).std(1).view(-1, 1, 1, 1), patterns)
    assert not torch.equal(raw_latents, latents)
