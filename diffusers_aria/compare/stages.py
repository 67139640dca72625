"""The work folder of a comparison: its plan, its stages and their resume markers.

    OUTPUT_DIR/compare_plan.json     the resolved settings; a second launch must give the same ones
    OUTPUT_DIR/stages/NAME.json      written (atomically) when stage NAME has finished; a finished stage is
                                     never run again, an unfinished one resumes (training from its latest
                                     checkpoint, generation from its finished shards)

Only the standard library is used.
"""

from __future__ import annotations

import json
import os
import time

from ..utils.atomic import atomic_write_json
from ..utils.errors import UserError

#: The stages in the order they run.
STAGES: tuple[str, ...] = ("prepare", "train-rc", "train-aria", "generate", "metrics", "table")
PLAN_NAME = "compare_plan.json"
#: Settings that may change between launches of one comparison (they change no result). The number of
#: processes is not one of them: it sets the global batch of the arms.
VOLATILE = frozenset({"stop_after"})


def check_stage_name(name: str | None, flag: str = "--stop_after") -> None:
    if name is not None and name not in STAGES:
        raise UserError(f"{flag} {name!r} is not a stage; choose one of {', '.join(STAGES)}")


class WorkFolder:
    """A comparison's output folder: the plan, the stage markers and the paths of everything in it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # --- the plan ------------------------------------------------------------------------------------------

    @property
    def plan_path(self) -> str:
        return self.path(PLAN_NAME)

    def read_plan(self) -> dict | None:
        if not os.path.isfile(self.plan_path):
            return None
        try:
            with open(self.plan_path) as fh:
                return json.load(fh)
        except (OSError, ValueError) as err:
            raise UserError(f"{self.plan_path!r} is damaged ({err}); choose a new --output_dir (the finished stages "
                            "in this one cannot be trusted without it)") from None

    def check_or_write_plan(self, settings: dict, allowed: frozenset[str] = frozenset()) -> bool:
        """Write the plan of a new comparison, or check that a resumed one has the same settings.

        Returns True when resuming. A folder that holds other files than `allowed` but no plan is refused (never
        mixed in).
        """
        old = self.read_plan()
        if old is None:
            others = set(os.listdir(self.root)) - set(allowed) if os.path.isdir(self.root) else set()
            if others:
                shown = ", ".join(sorted(others)[:6])
                raise UserError(f"--output_dir {self.root!r} is not empty and holds no {PLAN_NAME} (it holds {shown}); "
                                "choose a new folder for the comparison")
            os.makedirs(self.root, exist_ok=True)
            atomic_write_json(self.plan_path, settings)
            return False
        differ = [f"{k} {old.get(k)!r} (now {settings.get(k)!r})" for k in sorted(set(old) | set(settings))
                  if k not in VOLATILE and old.get(k) != settings.get(k)]
        if differ:
            raise UserError(f"--output_dir {self.root!r} holds a comparison started with other settings: "
                            f"{'; '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}; run the same command to "
                            "resume it, or choose a new --output_dir")
        return True

    # --- stage markers -------------------------------------------------------------------------------------

    def marker(self, stage: str) -> str:
        return self.path("stages", f"{stage}.json")

    def is_done(self, stage: str) -> bool:
        return os.path.isfile(self.marker(stage))

    def mark_done(self, stage: str, **info) -> None:
        atomic_write_json(self.marker(stage), {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})

    def stage_info(self, stage: str) -> dict:
        with open(self.marker(stage)) as fh:
            return json.load(fh)


__all__ = ["PLAN_NAME", "STAGES", "WorkFolder", "check_stage_name"]
