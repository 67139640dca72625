"""The smoke preset's inputs, made offline in a few seconds: what CI runs the whole comparison on.

- the teacher: the tiny offline teacher (`embedded.tiny_teacher.make_tiny_teacher`), unless `--teacher` names one;
- the prompt pool: 300 prompts of the built-in pool (30% of them animals, and small groups such as space,
  underwater or microscopy), as `pool.jsonl`;
- the paired data: 40 pool prompts of the large groups (animals included) with images the teacher generates,
  as an imagefolder: the small groups have no paired rows, so their regions are the "rare" split;
- the evaluation prompts: 18 other pool prompts (animals, small groups, large groups) with reference images the
  teacher generates from other seeds, as `eval.jsonl`;
- a tiny CLIP (random weights, built from a config, with a byte-level tokenizer that needs no download) for the
  CLIP score and as FID's feature extractor.

The numbers the smoke preset produces measure nothing: they show that every stage runs.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..utils.atomic import atomic_save, atomic_write_text

POOL_SIZE, NUM_PAIRED, EVAL_PER_KIND = 300, 40, 6
SMALL_GROUPS = ("space", "underwater", "musical_instruments", "typography", "microscopy", "abstract_art")
TINY_CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def smoke_paths(root: str) -> dict[str, str]:
    return {"teacher": os.path.join(root, "tiny-teacher"), "pool": os.path.join(root, "pool.jsonl"),
            "paired": os.path.join(root, "paired"), "eval": os.path.join(root, "eval.jsonl"),
            "clip": os.path.join(root, "tiny-clip")}


def make_tiny_clip(path: str, image_size: int = 32, seed: int = 0) -> str:
    """A random-weight `CLIPModel` and its `CLIPProcessor`, built from a config (no download), saved to `path`.

    The tokenizer is byte-level BPE with no merges: every byte of a prompt is a token.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(tmp, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(tmp, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPConfig(text_config={**TINY_CLIP_CONFIG, "vocab_size": len(vocab), "max_position_embeddings": 128,
                                     **special},
                        vision_config={**TINY_CLIP_CONFIG, "image_size": image_size, "patch_size": 8},
                        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    from ..utils.atomic import replace_dir

    replace_dir(tmp, path)
    return path


def _choose(records: list[dict], seed: int) -> tuple[list[int], list[int]]:
    """The pool indices of the paired rows and of the evaluation prompts (disjoint)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records)).tolist()
    paired = sorted([i for i in order if records[i]["group"] not in SMALL_GROUPS][:NUM_PAIRED])
    rest = [i for i in order if i not in set(paired)]
    kinds = {"animals": lambda g: g == "animals", "small": lambda g: g in SMALL_GROUPS,
             "large": lambda g: g != "animals" and g not in SMALL_GROUPS}
    evals = []
    for test in kinds.values():
        evals += [i for i in rest if test(records[i]["group"])][:EVAL_PER_KIND]
    return paired, sorted(evals)


def _save_images(pipe, prompts: list[str], paths: list[str], seed: int, steps: int = 2) -> None:
    import torch

    for start in range(0, len(prompts), 8):
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + j) for j in range(len(prompts[start:start + 8]))]
        with torch.no_grad():
            images = pipe(prompts[start:start + 8], num_inference_steps=steps, generator=gens, output_type="pil").images
        for img, path in zip(images, paths[start:start + 8]):
            atomic_save(path, lambda tmp, img=img: img.save(tmp, format="PNG"), suffix=".png")


def build_smoke_inputs(root: str, teacher: str | None = None, seed: int = 0, log=print) -> dict[str, str]:
    """Make (or reuse) the smoke inputs in `root`; returns their paths (`smoke_paths`, teacher resolved)."""
    from ..embedded.builtin_pool import builtin_prompt_records

    paths = smoke_paths(root)
    records = builtin_prompt_records(num_prompts=POOL_SIZE, seed=seed)
    if teacher is None:
        from ..embedded.tiny_teacher import make_tiny_teacher

        log(f"smoke: the tiny teacher in {paths['teacher']} (trained once, about 2-3 minutes on 2 CPU cores; reused "
            "after)")
        report = make_tiny_teacher(paths["teacher"], prompts=[r["prompt"] for r in records], seed=seed)
        log(f"smoke: tiny teacher at {report.path} ({'cached' if report.cached else 'trained'})")
    else:
        paths["teacher"] = teacher
    if not os.path.isfile(paths["pool"]):
        atomic_write_text(paths["pool"], "".join(json.dumps({"prompt": r["prompt"], "group": r["group"]}) + "\n"
                                                 for r in records))
    paired, evals = _choose(records, seed)
    need_paired = not os.path.isfile(os.path.join(paths["paired"], "metadata.jsonl"))
    if need_paired or not os.path.isfile(paths["eval"]):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(paths["teacher"], safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        if need_paired:
            os.makedirs(paths["paired"], exist_ok=True)
            names = [f"{i:04d}.png" for i in paired]
            _save_images(pipe, [records[i]["prompt"] for i in paired], [os.path.join(paths["paired"], n) for n in names],
                         seed=seed + 1)
            atomic_write_text(os.path.join(paths["paired"], "metadata.jsonl"), "".join(
                json.dumps({"file_name": n, "text": records[i]["prompt"], "group": records[i]["group"]}) + "\n"
                for i, n in zip(paired, names)))
        if not os.path.isfile(paths["eval"]):
            image_dir = os.path.join(root, "eval-images")
            os.makedirs(image_dir, exist_ok=True)
            names = [f"{i:04d}.png" for i in evals]
            _save_images(pipe, [records[i]["prompt"] for i in evals], [os.path.join(image_dir, n) for n in names],
                         seed=seed + 2)
            atomic_write_text(paths["eval"], "".join(
                json.dumps({"prompt": records[i]["prompt"], "image": os.path.join("eval-images", n),
                            "group": records[i]["group"]}) + "\n" for i, n in zip(evals, names)))
    make_tiny_clip(paths["clip"])
    return paths


__all__ = ["build_smoke_inputs", "make_tiny_clip", "smoke_paths"]
