"""The miniature world of the quality benchmark: prompts, text states, synthetic latents, teacher, student.

Everything here is deterministic for its seed and cached under ``benchmarks/results/cache`` (git-ignored):

* MiniLM token states (the cross-attention input) and mean-pooled sentence embeddings (the clustering and
  latent-synthesis space) of every prompt, computed once with the real all-MiniLM-L6-v2 ``BertModel``;
* the trained teacher UNet (``save_pretrained``), keyed by a hash of its settings and of the prompt set.

Nothing of the prompt file's content is written to the repository; caches hold only derived arrays.

The package's pieces are used where they are the same computation: the MiniLM loader, sizes, token states and
sentence embeddings (``diffusers_aria.embedded.minilm``), the anchor-mixture latents (``diffusers_aria.embedded.synthetic_latents``,
with the raw, unscaled anchor patterns these benchmarks were calibrated with), the DDPM schedule and its forward
noising (``diffusers_aria.embedded.tiny_teacher.tiny_scheduler``) and the cache writes (``diffusers_aria.utils.atomic``). Three
pieces compute something different from their package namesakes and stay here, each saying how in its docstring,
so that the recorded results stay reproducible: the teacher UNet and its training recipe (``unet_config``,
``train_or_load_teacher``), the text sensitivity (``text_sensitivity``) and the students (``make_student``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_aria.embedded.minilm import (
    CROSS_ATTENTION_DIM,
    TOKEN_LENGTH,
    attention_mask,
    load_minilm_text_encoder,
    pool_sentence_embeddings,
)
from diffusers_aria.embedded.minilm import encode_prompts as minilm_token_states
from diffusers_aria.embedded.synthetic_latents import synthetic_latents_and_anchors
from diffusers_aria.embedded.tiny_teacher import tiny_scheduler
from diffusers_aria.utils.atomic import atomic_save

LATENT_CHANNELS = 4


# ------------------------------------------------------------------------------------------- prompts
def load_parti(path: str, max_prompts: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """PartiPrompts (Prompt, Category) from the TSV at `path`; optionally a seeded subsample."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    prompts = [r["Prompt"] for r in rows]
    cats = [r["Category"] for r in rows]
    if max_prompts is not None and max_prompts < len(prompts):
        keep = np.sort(np.random.default_rng(seed).permutation(len(prompts))[:max_prompts])
        prompts = [prompts[i] for i in keep]
        cats = [cats[i] for i in keep]
    return prompts, cats


def fingerprint(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def encode_prompts(prompts: list[str], cache_dir: str, batch_size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """MiniLM token states [N, 32, 384] (float32) and L2-normalised mean-pooled embeddings [N, 384].

    Computed once per prompt set with ``diffusers_aria.embedded.minilm`` (one encoder pass: the sentence embeddings
    are pooled from the token states) and cached as .npy. The token states are stored in float16 and returned
    rounded to it whether computed or read, so the caller that fills the cache gets what every later caller reads
    (the quality benchmarks' main process fills it before their workers read it: their runs always had the
    rounded states).
    """
    os.makedirs(cache_dir, exist_ok=True)
    key = fingerprint(prompts)
    tok_path = os.path.join(cache_dir, f"minilm-tokens-{key}.npy")
    emb_path = os.path.join(cache_dir, f"minilm-sentence-{key}.npy")
    if os.path.exists(tok_path) and os.path.exists(emb_path):
        return torch.from_numpy(np.load(tok_path).astype(np.float32)), np.load(emb_path)
    model, tokenizer = load_minilm_text_encoder(TOKEN_LENGTH)
    tok = minilm_token_states(model, tokenizer, prompts, batch_size=batch_size).float()
    # = sentence_embeddings, one encoder pass less
    emb = pool_sentence_embeddings(tok, attention_mask(tokenizer, prompts)).numpy().astype(np.float32)
    tok16 = tok.numpy().astype(np.float16)
    atomic_save(tok_path, lambda tmp: np.save(tmp, tok16), suffix=".npy")
    atomic_save(emb_path, lambda tmp: np.save(tmp, emb), suffix=".npy")
    return torch.from_numpy(tok16.astype(np.float32)), emb


class TextStates:
    """A prompt's conditioning: MiniLM token states for cross-attention and, optionally, its pooled sentence
    embedding for the UNet's pooled-text projection (`class_embed_type="projection"`, added to the time
    embedding, as SDXL-style pooled text is). `text(unet, x, t, idx)` runs the UNet on prompts `idx`."""

    def __init__(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        self.tokens, self.pooled = tokens, pooled

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        labels = None if self.pooled is None else self.pooled[idx]
        return unet(x, t, self.tokens[idx], class_labels=labels).sample


# ------------------------------------------------------------------------------------------- latents
def synthetic_latents(emb: np.ndarray, num_anchors: int = 64, temperature: float = 0.05, size: int = 8,
                      seed: int = 1234) -> torch.Tensor:
    """Clean latent per prompt: a sharp softmax assignment over `num_anchors` anchor prompts (by cosine
    similarity of sentence embeddings), each anchor owning its own random 4 x size x size pattern.

    The patterns are independent, so the latents of one embedding cluster cannot be predicted from the
    others' (no extrapolation across clusters). Unit variance per prompt.
    """
    e = torch.from_numpy(np.asarray(emb, dtype=np.float32))
    return synthetic_latents_and_anchors(e, LATENT_CHANNELS, size, torch.Generator().manual_seed(seed),
                                         num_anchors=num_anchors, temperature=temperature, unit_patterns=False)[0]


# ------------------------------------------------------------------------------------------- models
def unet_config(width: int = 16, size: int = 8, pooled: bool = False) -> dict:
    """Config of the benchmark teacher UNet (`width` x (1, 2) channels, `size` x `size` latents).

    Differs from ``diffusers_aria.embedded.tiny_teacher.tiny_unet_config`` in its size and text pathway (one layer per
    block instead of two, 16/32 channels by default instead of 32/64, 2 heads instead of 4, 8 norm groups instead
    of 32; an optional pooled-text projection `class_embed_type="projection"` instead of the attention-pooled
    `addition_embed_type="text"`): kept so the recorded results stay reproducible.
    """
    extra = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": CROSS_ATTENTION_DIM} if pooled else {}
    return {**extra,
        "sample_size": size, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
        "layers_per_block": 1, "block_out_channels": (width, 2 * width),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": CROSS_ATTENTION_DIM,
        "attention_head_dim": 2, "norm_num_groups": 8,
    }


@dataclass
class TeacherInfo:
    path: str
    cached: bool
    train_seconds: float
    final_loss: float
    sensitivity: dict


def train_or_load_teacher(cache_dir: str, text: TextStates, latents: torch.Tensor, prompt_key: str,
                          steps: int = 2000, width: int = 16, batch: int = 32, lr: float = 2e-3,
                          target_noise: float = 0.05, seed: int = 0, log=print, only_if_cached: bool = False):
    """Train (or load from cache) the teacher on the synthetic latents of ALL prompts.

    Differs from ``diffusers_aria.embedded.tiny_teacher.make_tiny_teacher``'s training in its recipe (batch 32, 50
    warm-up steps, cosine to 5 % instead of 10 %, no empty-prompt dropout, pooled text passed as class labels
    through ``TextStates``) and its cache (a ``save_pretrained`` UNet keyed by the settings' hash, not a
    pipeline folder): kept so the recorded results stay reproducible.
    """
    from diffusers import UNet2DConditionModel

    cfg = unet_config(width, latents.shape[-1], pooled=text.pooled is not None)
    settings = {"cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, "steps": steps,
                "batch": batch, "lr": lr, "noise": target_noise, "seed": seed, "prompts": prompt_key,
                "latents": round(float(latents.double().sum()), 2), "recipe": 1}  # thread-count stable
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"teacher-{key}")
    info_path = os.path.join(path, "teacher_info.json")
    if os.path.exists(info_path):
        unet = UNet2DConditionModel.from_pretrained(path).eval().requires_grad_(False)
        with open(info_path) as fh:
            info = json.load(fh)
        return unet, TeacherInfo(path, True, info["train_seconds"], info["final_loss"], {})
    if only_if_cached:
        return None, None
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg)
    scheduler = tiny_scheduler()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    n = latents.shape[0]
    t0 = time.time()
    losses = []
    unet.train()
    for s in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = latents[idx] + target_noise * torch.randn(latents[idx].shape, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = text(unet, scheduler.add_noise(x0, noise, t), t, idx)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (s + 1) % 250 == 0:
            log(f"  teacher step {s + 1}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    unet.eval().requires_grad_(False)
    secs = time.time() - t0
    final = float(np.mean(losses[-50:]))
    # Written under a temporary name, then renamed. Not diffusers_aria.utils.atomic.replace_dir: the first worker's folder
    # is kept (same settings, so the same weights) and a later one drops its own copy.
    tmp = path + f".tmp-{os.getpid()}"
    unet.save_pretrained(tmp)
    with open(os.path.join(tmp, "teacher_info.json"), "w") as fh:
        json.dump({"train_seconds": secs, "final_loss": final, "settings": settings}, fh, indent=2)
    try:
        os.replace(tmp, path)
    except OSError:
        if not os.path.isdir(path):
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    unet = UNet2DConditionModel.from_pretrained(path).eval().requires_grad_(False)  # the real loading path
    return unet, TeacherInfo(path, False, secs, final, {})


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of a module's parameters and buffers, by name: two teachers of the same settings
    trained on different hosts can differ in their last bits, and so can every run that reads them."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def text_sensitivity(unet, text: TextStates, latents: torch.Tensor, timesteps, num_pairs: int = 128,
                     seed: int = 0) -> dict[int, float]:
    """E||eps(x_t,t,c1) - eps(x_t,t,c2)||^2 / E||eps(x_t,t,c1)||^2 with x_t from c1's latent.

    The metric of ``diffusers_aria.embedded.sensitivity.text_sensitivity``, but it differs from it in its draws and
    inputs (partners drawn as ``(c1 + randint(1, n)) % n`` rather than re-drawn until the strings differ, noise of
    the latents' shape per timestep, the two prompts in two UNet calls, precomputed ``TextStates`` with their
    pooled text rather than prompts and a text encoder): kept so the recorded results stay reproducible.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(text)
    a = torch.randint(0, n, (num_pairs,), generator=g)
    b = (a + torch.randint(1, n, (num_pairs,), generator=g)) % n
    scheduler = tiny_scheduler()
    out = {}
    for t in timesteps:
        noise = torch.randn((num_pairs,) + tuple(latents.shape[1:]), generator=g)
        tt = torch.full((num_pairs,), int(t), dtype=torch.long)
        x = scheduler.add_noise(latents[a], noise, tt)
        e1 = text(unet, x, tt, a)
        e2 = text(unet, x, tt, b)
        out[int(t)] = float(((e1 - e2) ** 2).sum() / (e1 ** 2).sum().clamp_min(1e-12))
    return out


def make_student(teacher, seed: int | None, mode: str = "reset", rank: int = 4):
    """Copy of the teacher whose cross-attention (attn2 to_q/to_k/to_v/to_out) is re-initialised.

    mode "reset": default PyTorch init of all four projections; "zero_out": the same, but the output
    projection starts at zero, so the student starts as the teacher with its text path cut off (its error
    is then the teacher's text dependence, not a random perturbation of every prediction); "text_kv": only
    the text-facing key and value projections are re-initialised (the image-side query and output
    projections stay the teacher's), so the student's error is its text pathway alone.

    A pooled-text projection (`class_embedding`, when the UNet has one) is re-initialised in every mode:
    it is a nonlinear (MLP) text path, which a student does not extrapolate to regions it never sees.

    Differs from ``diffusers_aria.distillation.students.build_student`` (BK-SDM block removal, every kept tensor
    copied from the teacher) in what it changes: the student has the teacher's architecture and its text
    pathway is re-initialised, so its error is the text dependence alone: kept so the recorded results stay
    reproducible.
    """
    import copy

    student = copy.deepcopy(teacher).train().requires_grad_(True)
    torch.manual_seed(10_000 + (seed or 0))  # None: one fixed student checkpoint for every run
    n = 0
    modes = ("reset", "zero_out", "text_kv", "lowrank_kv", "pooled")
    if mode not in modes:
        raise ValueError(f"student init {mode!r}: use one of {', '.join(modes)}")
    for name, mod in student.named_modules():
        if not name.endswith("attn2") or mode == "pooled":
            continue
        if mode == "lowrank_kv":
            for attr in ("to_k", "to_v"):
                lin = getattr(mod, attr)
                setattr(mod, attr, torch.nn.Sequential(torch.nn.Linear(lin.in_features, rank, bias=False),
                                                       torch.nn.Linear(rank, lin.out_features, bias=lin.bias is not None)))
                n += 1
        else:
            for lin in ((mod.to_k, mod.to_v) if mode == "text_kv" else (mod.to_q, mod.to_k, mod.to_v, mod.to_out[0])):
                lin.reset_parameters()
                n += 1
            if mode == "zero_out":
                torch.nn.init.zeros_(mod.to_out[0].weight)
                torch.nn.init.zeros_(mod.to_out[0].bias)
    for attr in ("encoder_hid_proj", "add_embedding", "class_embedding"):
        m = getattr(student, attr, None)
        if m is not None:
            for p in m.modules():
                if hasattr(p, "reset_parameters"):
                    p.reset_parameters()
                    n += 1
    assert n > 0, f"student init {mode!r} re-initialised nothing"
    return student
