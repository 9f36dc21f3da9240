"""Host-to-device copies that do not wait for the GPU.

A copy from pageable host memory (or a Python scalar written into a device tensor) blocks until every kernel queued
before it has run, so one such copy per step stalls the host behind the step it was meant to overlap. A copy from
pinned memory is queued on the stream like a kernel.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
