"""Process memory: what the run holds now (RSS, accelerator) and handing cached memory back.

Used by the training monitor, the Trainer's evaluation and ``evaluate``; torch and psutil are
imported when called, so importing this module costs nothing.
"""

from __future__ import annotations

import gc


def release_memory() -> None:
    """Return cached accelerator memory and collect garbage (evaluation leaves large tensors)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resource_usage() -> dict[str, float | None]:
    """Current process RSS and GPU memory in MB (GPU values None without CUDA)."""
    import psutil
    import torch

    usage: dict[str, float | None] = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if torch.cuda.is_available():
        usage["gpu_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        usage["gpu_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
    else:
        usage["gpu_allocated_mb"] = usage["gpu_reserved_mb"] = None
    return usage
