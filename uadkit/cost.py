"""What a paper run costs: FLOPs and memory of one training step at the real shapes, and the GPU-hours.

Everything here runs on PyTorch's ``meta`` device: tensors have shapes and dtypes but no
storage, so a ViT-L step at batch 64 is counted in a second on any laptop.

>>> step = measure(lambda: loss_fn(model, batch).backward(), model)   # model, batch on "meta"
>>> step.flops, step.activation_bytes
>>> estimate(step, steps=30_000, gpu="A100")                         # GPU-hours and peak memory

The estimates are arithmetic, not measurements: GPU-hours = FLOPs ÷ (the GPU's dense bf16
peak × :data:`UTILISATION`), and peak memory = weights + gradients + Adam's two moments +
the activations saved for the backward pass, × 1.2 for the allocator's slack. Chapters say so
where they print them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["StepCost", "measure", "estimate", "GPUS", "UTILISATION"]

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets; the T4 has no bf16 and runs fp16).
GPUS = {"A100": 312.0, "H100": 989.0, "T4": 65.0}
GPU_MEMORY_GB = {"A100": 80.0, "H100": 80.0, "T4": 16.0}
UTILISATION = 0.35  # the fraction of peak that training loops of this size typically reach (an assumption)


@dataclass(frozen=True)
class StepCost:
    """One call of a step function: FLOPs, bytes saved for backward, and the model's parameter bytes."""

    flops: int
    activation_bytes: int
    param_bytes: int
    trainable_bytes: int

    def __add__(self, other: "StepCost") -> "StepCost":  # e.g. a frozen teacher's pass plus a student's step
        return StepCost(self.flops + other.flops, max(self.activation_bytes, other.activation_bytes),
                        self.param_bytes + other.param_bytes, self.trainable_bytes + other.trainable_bytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(step: Callable[[], object], *modules: torch.nn.Module) -> StepCost:
    """Run ``step()`` once and count its FLOPs and the activations autograd keeps for the backward pass.

    ``modules`` are the networks whose weights sit on the GPU during the step (frozen ones
    included); only their ``requires_grad`` parameters count as trained. Put them and the
    inputs on ``"meta"`` to count without computing.
    """
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage() if t.device.type != "meta" else None
            key = storage.data_ptr() if storage is not None and storage.data_ptr() else id(t)
            saved[key] = max(saved.get(key, 0), _nbytes(t))
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    params = {id(p): p for m in modules for p in m.parameters()}
    buffers = sum(_nbytes(b) for m in modules for b in m.buffers())
    return StepCost(flops=int(counter.get_total_flops()), activation_bytes=sum(saved.values()),
                    param_bytes=sum(_nbytes(p) for p in params.values()) + buffers,
                    trainable_bytes=sum(_nbytes(p) for p in params.values() if p.requires_grad))


def estimate(step: StepCost, *, steps: int, gpu: str = "A100", extra_flops: float = 0.0,
             amp: bool = True) -> dict[str, float]:
    """GPU-hours for ``steps`` such steps (+ ``extra_flops``, e.g. evaluation) and the peak memory in GB.

    With ``amp`` the saved activations are taken at half their fp32 size (bf16 autocast).
    """
    if gpu not in GPUS:
        raise KeyError(f"unknown GPU {gpu!r}; one of {', '.join(GPUS)}")
    total = step.flops * steps + extra_flops
    hours = total / (GPUS[gpu] * 1e12 * UTILISATION) / 3600
    act = step.activation_bytes / (2 if amp else 1)
    peak = 1.2 * (step.param_bytes + 3 * step.trainable_bytes + act) / 1e9  # + grads + Adam m, v
    return {"GPU-hours": hours, "peak GB": peak, "fits": peak <= GPU_MEMORY_GB[gpu], "PFLOP": total / 1e15}
