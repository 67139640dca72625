"""`diffusers-aria compare`: RC vs ARIA on RC's unseen-concept protocol, from the paired data to one table.

| module | concept |
|---|---|
| `concepts` | the concept filter that defines "unseen" (the default animal keywords, a keyword file, a label column) |
| `paired` | the paired data with the unseen rows dropped, written into the work folder for the training script |
| `eval_set` | the evaluation prompts, their reference images and their split (seen / unseen / rare) |
| `presets` | the presets (`smoke`, `one-gpu`, `paper`) and the planned cost |
| `stages` | the work folder: the plan, the stages and their resume markers |
| `launch` | the `accelerate launch` command lines (the training script's in one function) |
| `generate` | the sharded, resumable generation worker and the per-prompt epsilon error |
| `metrics` | FID (torchmetrics, injectable features) and CLIP score (torchmetrics with transformers' CLIP) |
| `table` | the Markdown + JSON table |
| `smoke` | the smoke preset's offline inputs (tiny teacher data, tiny CLIP) |
| `command` | the command: arguments, checks, the stages in order |

Importing this package loads nothing heavy: `add_parser` registers the subcommand on the `diffusers-aria`
command line.
"""

from __future__ import annotations

from .command import add_parser, run

__all__ = ["add_parser", "run"]
