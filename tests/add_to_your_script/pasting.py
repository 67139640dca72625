"""docs/add-to-your-script.md as a user applies it: its three blocks, read from the page, pasted right after the
stock lines it names into reduced copies of diffusers' text-to-image examples (tests/assets/minimal_*.py).

Here: the page's blocks and named lines, the pasting, one process of a two-process run, and what a resumed run
is compared by.
"""

from __future__ import annotations

import ast
import json
import os
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "add-to-your-script.md"
ASSETS = ROOT / "tests" / "assets"
NUM_BLOCKS = 3
# diffusers' example -> the reduced copy of its stock structure that the blocks are pasted into
SCRIPTS = {
    "train_text_to_image.py": "minimal_text_to_image.py",
    "train_text_to_image_lora.py": "minimal_text_to_image_lora.py",
    "train_text_to_image_sdxl.py": "minimal_text_to_image_sdxl.py",
    "train_text_to_image_lora_sdxl.py": "minimal_text_to_image_lora_sdxl.py",
}
NUM_IMAGES = 64  # block 1 builds about one region per 4 captions (16)


def doc_blocks(doc: str) -> dict[int, str]:
    """Block number -> its code as the page shows it (the ```python fence whose first line is its marker)."""
    blocks = {}
    for body in re.findall(r"```python\n(.*?)```", doc, flags=re.S):
        marker = re.match(rf"# --- ARIA \((\d)/{NUM_BLOCKS}\)", body)
        if marker:
            assert int(marker.group(1)) not in blocks, f"block {marker.group(1)} is shown twice"
            blocks[int(marker.group(1))] = body
    return blocks


def named_lines(doc: str) -> dict[int, str]:
    """Block number -> the stock line the page says it follows (its heading: `## N. After `line``)."""
    return {int(n): line for n, line in re.findall(r"(?m)^## (\d)\. After `([^`]+)`$", doc)}


def _same_statement(source: str, named: str) -> bool:
    have, want = " ".join(source.split()), " ".join(named.split())
    if want.endswith("(...)"):  # the whole statement, of which the page shows the start
        return have.startswith(want[: -len("...)")])
    return have == want


def named_statement(script: str, named: str) -> ast.stmt:
    """The one statement of `script` that the page's named line denotes (an error if none or several)."""
    found = [node for node in ast.walk(ast.parse(script)) if isinstance(node, ast.stmt)
             and _same_statement(ast.get_source_segment(script, node), named)]
    if len(found) != 1:
        raise AssertionError(f"the stock line `{named}` occurs {len(found)} times in the script, not once")
    return found[0]


def paste(script: str, doc: str) -> str:
    """`script` with every block of `doc` pasted, unchanged, right after the statement the page names, at that
    statement's indentation: what a user does."""
    blocks, named = doc_blocks(doc), named_lines(doc)
    assert sorted(blocks) == sorted(named) == list(range(1, NUM_BLOCKS + 1)), (sorted(blocks), sorted(named))
    lines = script.splitlines(keepends=True)
    inserts = []
    for n in blocks:
        stmt = named_statement(script, named[n])
        inserts.append((stmt.end_lineno, textwrap.indent(blocks[n], " " * stmt.col_offset)))
    for end, text in sorted(inserts, reverse=True):
        lines.insert(end, text)
    return "".join(lines)


# What every forked process imports anyway: loaded once, in the fork server, before any of them starts.
PRELOAD = ["torch", "accelerate", "datasets", "safetensors", "PIL.Image", "peft", "sentence_transformers",
           "diffusers.models.autoencoders.autoencoder_kl", "diffusers.models.unets.unet_2d_condition",
           "diffusers.schedulers.scheduling_ddpm", "diffusers.optimization", "diffusers.training_utils",
           "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
           "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
           "transformers.models.bert.modeling_bert", "transformers.models.clip.modeling_clip",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "torch.utils.tensorboard",
           "diffusers_aria", "diffusers_aria.regions", "diffusers_aria.sampler", "diffusers_aria.callback",
           "diffusers_aria.reporting", "diffusers_aria.training.outputs"]


class _Process:
    """One process of a two-process run: the environment `accelerate.debug_launcher` sets, the process group
    (gloo over a file store, as `debug_launcher`'s), then the pasted script as `__main__`."""

    def __init__(self, script: str, argv: list[str], env: dict[str, str]) -> None:
        self.script, self.argv, self.env = script, argv, env

    def __call__(self, index: int) -> None:
        import multiprocessing
        import sys

        import torch
        from accelerate.utils.launch import PrepareForLaunch

        os.environ.update(self.env)
        multiprocessing.set_start_method("fork", force=True)  # DataLoader workers as under accelerate launch
        torch.set_num_threads(1)  # two processes on two cores
        sys.path.insert(0, str(ASSETS))  # the assets' test-only helpers (aria_test_hooks)
        sys.argv = [self.script, *self.argv]
        PrepareForLaunch(_run_as_main, debug=True)(index, self.script)


def _run_as_main(script: str) -> None:
    import runpy

    runpy.run_path(script, run_name="__main__")


def run_two_processes(script: Path, argv: list, timeout: float = 600) -> None:
    """The script in 2 CPU processes (gloo), like `accelerate.debug_launcher` but forked from a fork server
    rather than from this process: a process forked after this one used OpenMP threads can hang in its first
    parallel region (GNU libgomp is not fork-safe), and the server imports the libraries only once for every
    run of the session. A run still going after `timeout` seconds is killed and fails the test."""
    import tempfile
    import time

    import torch.multiprocessing as mp

    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # used when the server starts (the first run)
    with tempfile.TemporaryDirectory() as rdv:
        env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "ACCELERATE_MIXED_PRECISION": "no",
               "ACCELERATE_DEBUG_RDV_FILE": os.path.join(rdv, "store"), "ACCELERATE_USE_CPU": "yes",
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        run = mp.start_processes(_Process(str(script), [str(a) for a in argv], env), nprocs=2, join=False,
                                 start_method="forkserver")
        deadline = time.monotonic() + timeout
        while not run.join(timeout=1):  # raises with the failing process's traceback
            if time.monotonic() > deadline:
                for process in run.processes:
                    process.kill()
                raise AssertionError(f"{script.name} {' '.join(map(str, argv))} still ran after {timeout} s")


def rank_records(out: Path) -> list[dict]:
    """What each rank trained on (tests/assets/aria_test_hooks.py `record`)."""
    return [json.loads((out / f"trained_rank{r}.json").read_text()) for r in range(2)]


def aria_state(checkpoint: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    plain = json.loads((checkpoint / "aria_state.json").read_text())["state"]
    return load_file(checkpoint / "aria_state.safetensors"), plain


def assert_resumed_like_uninterrupted(straight: Path, resumed: Path, resumed_at: int) -> None:
    """Every micro-batch after the checkpoint (rows' regions, loss, step) and ARIA's whole state at the end
    (tracker, policy, sampler, history) are bit-identical to the uninterrupted run's, on both ranks."""
    for straight_rank, resumed_rank in zip(rank_records(straight), rank_records(resumed)):
        after = [m for m in straight_rank["trained"] if m[0] >= resumed_at]
        assert after and resumed_rank["trained"] == after
        assert resumed_rank["state"] == straight_rank["state"]
        assert resumed_rank["probs"] == straight_rank["probs"]
