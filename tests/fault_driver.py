"""Runs ``socratune train`` in this process with one fault injected; tests/test_runs.py starts it
as a subprocess and then checks that the run resumes to the same result as an uninterrupted one.

    python tests/fault_driver.py FAULT STEP train --output RUN ...

FAULT is one of:
  kill-after-step     SIGKILL right after optimizer step STEP, before any checkpoint of that step
  term-after-step     SIGTERM to itself after step STEP: training must save a checkpoint and exit 143
  kill-in-checkpoint  SIGKILL halfway through writing optimizer.pt of checkpoint-STEP
  kill-in-final       SIGKILL after the final adapter is staged, before it is renamed into place
                      (STEP is ignored)
  kill-in-base        SIGKILL halfway through writing config.json of the tiny base model as it is
                      materialized for the run (STEP is ignored)

The hooks patch this process only (the Trainer's ``torch.save`` and socratune's own callback and
rename functions); nothing in the package knows about them.
"""

from __future__ import annotations

import io
import os
import signal
import sys


def _kill(signal_number: int = signal.SIGKILL) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal_number)


def install(fault: str, step: int) -> None:
    import torch

    import socratune.training.train
    from socratune.training.callbacks import TrainingMonitorCallback

    if fault in ("kill-after-step", "term-after-step"):
        signal_number = signal.SIGKILL if fault == "kill-after-step" else signal.SIGTERM

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                _kill(signal_number)

        TrainingMonitorCallback.on_step_end = on_step_end
    elif fault == "kill-in-checkpoint":
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if isinstance(f, str) and f.endswith(os.path.join(f"checkpoint-{step}", "optimizer.pt")):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as handle:
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                _kill()
            return real_save(obj, f, *args, **kwargs)

        torch.save = half_save
    elif fault == "kill-in-final":
        socratune.training.train.replace_dir_atomic = lambda staged, final: _kill()
    elif fault == "kill-in-base":
        from transformers import PreTrainedModel

        def half_saved(self, directory, *args, **kwargs):
            text = self.config.to_json_string()
            with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
                handle.write(text[: len(text) // 2])
            _kill()

        PreTrainedModel.save_pretrained = half_saved
    else:
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from socratune.cli import main

    sys.exit(main(sys.argv[3:]))
