"""Several processes, one run: what ``socratune train`` adds to torchrun / ``accelerate launch``.

The launcher sets ``RANK`` and ``WORLD_SIZE``; the Trainer (through accelerate) does the data
parallel work: it shards every global batch over the processes and averages gradients. What it
does not know is socratune's run directory, so:

- the main process alone decides (new, resume, refused) and writes (config, split, base model,
  checkpoint manifests, metrics, final model); it *shares* each decision, so no process can go
  its own way and leave the others waiting at a collective;
- the others wait at a barrier, then read what it wrote (every process trains on the persisted
  split);
- a timeout on the process group turns a lost process into an error instead of a hang; torchrun
  itself stops the other workers when one dies.

On one process every method here is a no-op, so the single-process path is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from ..core.errors import ModelError, SocratuneError

T = TypeVar("T")
# How long a process waits for the others at a barrier or collective before failing (the style
# evaluation on the main process is the longest lone stretch, seconds to minutes).
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """This process's place as set by torchrun / accelerate launch (one process when unset)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self) -> None:
        """Create the process group (gloo on CPU, nccl on CUDA) unless the launcher already did."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise ModelError("this PyTorch build has no torch.distributed; run on one process or install a full build")
        if dist.is_initialized():
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value: Any = None) -> Any:
        """The main process's ``value``, on every process."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, decision: Callable[[], T]) -> T:
        """Run ``decision`` on the main process and give its result (or its SocratuneError) to all."""
        outcome: Any = None
        if self.is_main:
            try:
                outcome = decision()
            except SocratuneError as exc:
                outcome = exc
        outcome = self.share(outcome)
        if isinstance(outcome, SocratuneError):
            raise outcome
        return outcome

    def main_first(self, action: Callable[[], T]) -> T:
        """Run ``action`` on the main process, then on the others once it has finished (for
        actions that write on first use and read afterwards, such as saving the tiny base)."""
        if self.is_main:
            result = action()
            self.barrier()
            return result
        self.barrier()
        return action()

    def any_flag(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any of them."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([1 if flag else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


SINGLE_PROCESS = Ranks()


def sharding_engine() -> str | None:
    """The engine of this ``accelerate launch`` if it shards parameters over the processes:
    ``"fsdp"`` or ``"deepspeed-zero3"``, read from the variables the launcher sets; None for DDP,
    ZeRO-1/2 or no launcher. Sharded QLoRA needs its own loading rules (see ``modeling``)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "deepspeed-zero3"
    return None


def gather_trainable_shards(model: Any) -> dict[str, Any] | None:
    """The trainable (adapter) weights, whole and on the CPU, when FSDP2 has sharded them (each
    is then a DTensor holding this process's slice); None when they are whole already.

    Gathering is a collective: every process must call this, though only the main one saves.
    Only the trainable weights are gathered, not the frozen base, which can be far larger.
    """
    from torch.distributed.tensor import DTensor

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not any(isinstance(p, DTensor) for p in trainable.values()):
        return None
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu() for name, p in trainable.items()}
