"""Fault injection for the reliability tests, loaded into training subprocesses through PYTHONPATH.

ARIA_KILL_DURING_SAVE=N: at the checkpoint of step N, write part of the checkpoint into its temporary folder,
then SIGKILL this process (as a preemption in the middle of a checkpoint write would).
"""

import os

_kill_step = os.environ.get("ARIA_KILL_DURING_SAVE")
if _kill_step:
    import signal

    import diffusers_aria.training.checkpointing as _ckpt

    _original = _ckpt.save_checkpoint

    def _save_then_die(accelerator, output_dir, step, total_limit=None):
        if step == int(_kill_step):
            tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
            os.makedirs(tmp, exist_ok=True)
            accelerator.save_state(tmp)
            os.remove(os.path.join(tmp, "aria_state.json"))  # the write was cut short
            os.kill(os.getpid(), signal.SIGKILL)
        return _original(accelerator, output_dir, step, total_limit)

    _ckpt.save_checkpoint = _save_then_die
