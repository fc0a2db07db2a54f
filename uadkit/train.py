"""A small training loop: seeding, device, AMP (bf16 autocast), progress bar, checkpoints that resume.

Not a framework: a chapter writes its own loss as ``loss_fn(model, batch)`` and calls

>>> history = fit(model, loss_fn, loader, epochs=50, optimizer=opt, device=P.device,
...               checkpoint="_build/ckpt/adtr_brick.pt")

An interrupted run called again with the same checkpoint path continues from the
last finished epoch and ends with exactly the weights an uninterrupted run gives.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm  # text bars: readable in terminals, notebooks, Colab and the rendered book

from .profiles import pick_device

__all__ = ["seed_everything", "pick_device", "make_generator", "to_device", "fit", "predict", "load_checkpoint",
           "use_amp", "autocast"]


def use_amp(device: str, amp: bool | None = None) -> bool:
    """Whether to train under bf16 autocast: ``amp`` if given, else on CUDA, and in a dry run on any device
    (the CPU has a bf16 autocast too, so a dry run executes the mixed-precision path that CUDA takes)."""
    from . import dryrun

    if amp is not None:
        return bool(amp)
    return str(device).startswith("cuda") or dryrun.active()


def autocast(device: str, enabled: bool):
    """bf16 autocast on ``device``'s type ("cuda", "cpu", ...); a no-op when not ``enabled``."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=enabled and kind in ("cuda", "cpu"))


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_device(batch, device):
    """Move the tensors of a batch (a tensor, or a dict/list/tuple of them) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
             "numpy_pos": np.random.get_state()[2],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"])))
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _generator_of(loader):
    sampler = getattr(loader, "sampler", None)
    return getattr(sampler, "generator", None) or getattr(loader, "generator", None)


def save_checkpoint(path: Path, **state) -> None:
    """Write atomically: a crash mid-write never leaves a broken checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`fit`; a file that cannot be read is an error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, UnpicklingError, RuntimeError from a truncated zip, ...
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Delete the file to "
                           "start this training afresh.") from e


# The settings that shape a training run ("fingerprint"), stored in its checkpoint. Detector.fit sets it
# for the trainings of one fit; a checkpoint written under other settings is refused, never resumed.
_fingerprint: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fingerprint", default=None)


@contextlib.contextmanager
def fingerprint(settings: dict | None):
    """Within this block, :func:`fit` stores ``settings`` in its checkpoints and refuses to resume one
    that holds other settings."""
    token = _fingerprint.set(None if settings is None else json.loads(json.dumps(settings, default=str)))
    try:
        yield
    finally:
        _fingerprint.reset(token)


def _check_fingerprint(path: Path, state: dict, expected: dict | None) -> None:
    stored = state.get("fingerprint")
    if expected is None or stored is None or stored == expected:
        return
    changed = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
    detail = "; ".join(f"{k}: checkpoint {stored.get(k)!r}, now {expected.get(k)!r}" for k in changed)[:600]
    raise ValueError(f"checkpoint {path} was written by a run with other settings ({detail}). It is not "
                     "resumed: delete it, or pass another checkpoint path, to train afresh.")


def fit(model: torch.nn.Module, loss_fn: Callable, loader, *, epochs: int, optimizer: torch.optim.Optimizer,
        device: str = "cpu", checkpoint: str | os.PathLike | None = None, resume: bool = True,
        amp: bool | None = None, scheduler=None, desc: str = "train", progress: bool = True) -> list[float]:
    """Train ``model`` for ``epochs`` epochs; returns the mean loss of every epoch.

    ``loss_fn(model, batch)`` returns a scalar; batches are moved to ``device`` first.
    AMP (bfloat16 autocast) is used on CUDA unless ``amp=False``; ``amp=True`` turns it on for
    the CPU as well (see :func:`use_amp`). With ``checkpoint``, the state is saved after every
    epoch and, if ``resume``, a saved state is resumed. In a dry run (:mod:`uadkit.dryrun`)
    training stops after 1 epoch of at most ``dryrun.MAX_STEPS`` steps.
    """
    from . import dryrun

    model.to(device)
    amp_on = use_amp(device, amp)
    max_steps = dryrun.steps(10**12) if dryrun.active() else None
    epochs = dryrun.epochs(epochs)
    history: list[float] = []
    start = 0
    path = Path(checkpoint) if checkpoint else None
    gen = _generator_of(loader)
    settings = _fingerprint.get()
    if path is not None and resume and path.is_file():
        state = load_checkpoint(path)
        _check_fingerprint(path, state, settings)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        history, start = list(state["history"]), int(state["epoch"])
        _set_rng_state(state["rng"])
        if gen is not None and "loader_rng" in state:
            gen.set_state(state["loader_rng"])
    bar = tqdm(range(start, epochs), desc=desc, disable=not progress, initial=start, total=epochs)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            if max_steps is not None and count >= max_steps:
                break
            batch = to_device(batch, device)
            with autocast(device, amp_on):
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        if scheduler is not None:
            scheduler.step()
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4g}")
        if path is not None:
            extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
            if gen is not None:
                extra["loader_rng"] = gen.get_state()
            if settings is not None:
                extra["fingerprint"] = settings
            save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1,
                            history=history, rng=_rng_state(), **extra)
    model.eval()
    return history


@torch.no_grad()
def predict(fn: Callable, loader, *, device: str = "cpu"):
    """Apply ``fn(batch)`` to every batch and concatenate the outputs (a tensor or a tuple of them) on the CPU."""
    outs = []
    for batch in loader:
        out = fn(to_device(batch, device))
        outs.append(tuple(o.detach().cpu() for o in out) if isinstance(out, tuple) else out.detach().cpu())
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)
