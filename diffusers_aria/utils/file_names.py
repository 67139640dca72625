"""File names that one module writes and others read, spelled once in a module that imports nothing.

`preflight` checks folders before torch and diffusers load, so a name it looks for cannot live in the module
that writes the file when that module imports torch (as `tiny_teacher` does); such names live here.
"""

from __future__ import annotations

__all__ = ["TEACHER_REPORT"]

#: Written by `tiny_teacher.make_tiny_teacher` into the teacher folder (settings, text sensitivity, and the `hub_id`
#: the teacher was made from, if any); read by `preflight` (is this folder a tiny teacher?), `model_card` (the
#: teacher's Hub id) and `run_setup` (the card's teacher table).
TEACHER_REPORT = "aria_teacher_report.json"
