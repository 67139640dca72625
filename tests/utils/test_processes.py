"""`launched_state`: the process layout of a launched run as `Accelerator` sees it, on CPU too."""

from __future__ import annotations

import json
import os


def _worker(out_dir: str) -> None:
    from diffusers_aria.utils.processes import launched_state

    state = launched_state()
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as fh:
        json.dump({"num_processes": state.num_processes, "device": state.device.type}, fh)


def test_two_cpu_processes_see_each_other(tmp_path, debug_launch):
    debug_launch(_worker, args=(str(tmp_path),), num_processes=2)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen == [{"num_processes": 2, "device": "cpu"}] * 2
