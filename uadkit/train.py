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
import errno
import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm  # text bars: readable in terminals, notebooks, Colab and the rendered book

from .profiles import pick_device

__all__ = ["seed_everything", "pin_cpu", "CPU_PINS", "pick_device", "make_generator", "to_device", "split_batch", "fit", "predict",
           "load_checkpoint", "use_amp", "amp_dtype", "autocast", "grad_scaler"]


def use_amp(device: str, amp: bool | None = None) -> bool:
    """Whether to train under bf16 autocast: ``amp`` if given, else on CUDA, and in a dry run on a CPU with
    native bf16 (:func:`uadkit.dryrun.cpu_amp`), so that a dry run executes the mixed-precision path that
    CUDA takes where that costs no more than float32."""
    from . import dryrun

    if amp is not None:
        return bool(amp)
    if str(device).startswith("cuda"):
        return True
    return dryrun.active() and str(device).startswith("cpu") and dryrun.cpu_amp()


def amp_dtype(device: str) -> torch.dtype:
    """The autocast type on ``device``: bf16, except on a CUDA GPU without native bf16 (before Ampere, such
    as Colab's T4), where it is float16 and the loss is scaled against underflow (:func:`grad_scaler`)."""
    d = torch.device(device)
    if d.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(d)[0] < 8:
        return torch.float16
    return torch.bfloat16


def autocast(device: str, enabled: bool):
    """Autocast (:func:`amp_dtype`: bf16, or float16 on a GPU without bf16) on ``device``'s type ("cuda",
    "cpu", ...); a no-op when not ``enabled``."""
    kind = torch.device(device).type
    on = enabled and kind in ("cuda", "cpu")
    return torch.autocast(device_type=kind, dtype=amp_dtype(device) if on else torch.bfloat16, enabled=on)


def grad_scaler(device: str, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler for a training step under ``autocast(device, enabled)``: it scales the loss where that
    autocast is float16 (a GPU without bf16, such as Colab's T4), so that small gradients do not underflow,
    and skips a step whose gradients overflowed; for bf16 and float32 it passes everything through."""
    return torch.amp.GradScaler("cuda", enabled=enabled and amp_dtype(device) == torch.float16)


# The CPU math libraries' own switches, each read lazily at its first use (so setting them after
# ``import torch`` but before the first computation still counts). On the book's 2-core machine each was
# measured (a conv/attention network, 100 AdamW steps, parameters hashed):
# * the thread count changes the result under every kernel setting (reductions are split per thread),
#   so the count is fixed rather than taken from the machine: one thread, because the smoke profile's
#   small networks gain next to nothing from a second one (two chapters side by side at one thread each
#   took 149 s and 166 s, one after the other at two threads 170 s and 163 s), so two cores run two
#   chapters at once;
# * oneDNN's ISA cap changes the result (convolutions and linear layers otherwise use the widest
#   vector unit the CPU has), so a machine with AVX-512 and one with AVX2 only run the same kernels;
# * oneMKL's conditional numerical reproducibility changed LAPACK results (SVD), not GEMM, here; it
#   makes Intel and AMD CPUs take the same MKL code path;
# * ATen's own kernels gave identical numbers at AVX2 and AVX-512 on the networks tried and other ones
#   with no vector unit ("default"); AVX2 is pinned so that AVX-512 and AVX2-only machines agree.
# A value already in the environment wins (``ATEN_CPU_CAPABILITY=default make test`` tests another
# kernel set); what no switch removes (another CPU's rounding) the checked cells absorb in bands.
# The cap has a price: bf16 convolutions without the CPU's native bf16 instructions ran 30 times slower
# (ResNet-50, one thread: 1.86 s against 0.06 s), so the paper profile's dry run, which trains under
# bf16 autocast and checks no numbers, sets UADKIT_CPU_PINS=0 and keeps the machine's kernels.
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
DEFAULT_THREADS = 1


def pin_cpu(threads: int | None = None) -> int:
    """Pin what makes CPU results depend on the machine: the math libraries' kernel sets
    (:data:`CPU_PINS`, unless already set or ``$UADKIT_CPU_PINS`` is 0) and torch's thread count: ``threads``, else
    ``$UADKIT_THREADS``, else 1 (0 = the machine's count). Returns the thread count in force.
    Where CUDA is available the thread count is left alone (the GPU computes the results)."""
    if os.environ.get("UADKIT_CPU_PINS", "1") != "0":  # 0: the machine's widest kernels (fast bf16; the dry run)
        for key, value in CPU_PINS.items():
            os.environ.setdefault(key, value)
    if threads is None:
        raw = os.environ.get("UADKIT_THREADS", str(DEFAULT_THREADS))
        try:
            threads = int(raw)
        except ValueError:
            raise ValueError(f"UADKIT_THREADS must be an integer (0 = all cores), got {raw!r}") from None
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = all cores), got {threads}")
    if threads and not torch.cuda.is_available() and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch, ask torch for deterministic kernels, and pin the CPU's
    kernel sets and thread count (:func:`pin_cpu`), so a run repeats to the bit on one machine."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise TypeError(f"seed must be an integer in 0..2**32 - 1, got {seed!r} ({type(seed).__name__})")
    pin_cpu()
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


def _batch_len(batch) -> int | None:
    """Items in a batch: the length of its first tensor (a tensor, or inside a dict/list/tuple)."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        n = _batch_len(v)
        if n is not None:
            return n
    return None


def _take(batch, part: slice, n: int):
    """Items ``part`` of a batch of ``n`` items: tensors and lists of length ``n`` are cut, the rest kept."""
    if isinstance(batch, torch.Tensor):
        return batch[part]
    if isinstance(batch, dict):
        return {k: _take(v, part, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if all(not isinstance(v, (torch.Tensor, dict, list, tuple)) for v in batch) and len(batch) == n:
            return type(batch)(batch[part])  # per-item values (names, categories)
        return type(batch)(_take(v, part, n) for v in batch)
    return batch


def split_batch(batch, size: int) -> list[tuple[object, float]]:
    """A batch cut into parts of at most ``size`` items, each with its share of the batch:
    ``[(part, len(part) / len(batch)), ...]`` (the whole batch, share 1, when it is not larger)."""
    n = _batch_len(batch)
    if n is None or n <= size:
        return [(batch, 1.0)]
    return [(_take(batch, slice(lo, lo + size), n), min(size, n - lo) / n) for lo in range(0, n, size)]


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
    """Write atomically (a crash mid-write never leaves a broken checkpoint behind), with the sha256 of
    its contents, so that a file changed on disk afterwards (a flipped byte) is refused on loading.
    A disk without room for it is an ``OSError`` (``ENOSPC``) that gives the checkpoint's size and the
    room left, raised before writing where that can be told; the previous checkpoint stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = path.with_suffix(path.suffix + ".tmp")
    free = shutil.disk_usage(path.parent).free
    if free < len(payload) + CHECKPOINT_SLACK:  # say so now, not halfway through the file
        raise _no_room(path, len(payload), free)
    try:
        torch.save({"uadkit_checkpoint": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
                    "sha256": hashlib.sha256(payload).hexdigest()}, tmp)
    except (OSError, RuntimeError) as e:  # a disk that fills up mid-write: torch says "unexpected pos"
        free = shutil.disk_usage(path.parent).free  # measured with the partial file still there
        tmp.unlink(missing_ok=True)
        if getattr(e, "errno", None) == errno.ENOSPC or free < CHECKPOINT_SLACK:
            raise _no_room(path, len(payload), free, e) from e
        raise RuntimeError(f"cannot write checkpoint {path}: {type(e).__name__}: {e}") from e
    os.replace(tmp, path)


# room kept free beyond a checkpoint's own size (the zip container around it, and the disk's other users)
CHECKPOINT_SLACK = 64 * 2**20


def _no_room(path: Path, size: int, free: int, error: Exception | None = None) -> OSError:
    why = f"writing it failed ({type(error).__name__}: {error})" if error else "there is not enough room"
    return OSError(errno.ENOSPC,
                   f"cannot write checkpoint {path} ({size / 2**20:,.0f} MB; {free / 2**20:,.0f} MB free on that "
                   f"disk): {why}. Free some disk space, or keep checkpoints on a larger disk (the chapters keep "
                   "theirs under $UADKIT_RESULTS); the training can then be run again and resumes from its last "
                   "checkpoint.")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`fit`; a file that cannot be read, or whose contents no longer match
    their checksum, is an error naming it."""
    def unreadable(why: str) -> RuntimeError:
        return RuntimeError(f"cannot read checkpoint {path}: {why}. Delete the file to start this training afresh.")

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "uadkit_checkpoint" in state:  # a payload with its checksum
            payload = state["uadkit_checkpoint"].numpy().tobytes()
            if hashlib.sha256(payload).hexdigest() != state.get("sha256"):
                raise unreadable("its contents do not match their checksum (the file was changed or damaged)")
            inner = io.BytesIO(payload)
            state = torch.load(inner, map_location="cpu", weights_only=True)
        return state
    except RuntimeError as e:
        if str(e).startswith(f"cannot read checkpoint {path}"):
            raise
        raise unreadable(f"{type(e).__name__}: {e}") from e
    except Exception as e:  # EOFError, UnpicklingError, KeyError, OSError from a truncated or foreign file
        raise unreadable(f"{type(e).__name__}: {e}") from e


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
        amp: bool | None = None, scheduler=None, desc: str = "train", progress: bool = True,
        micro_batch: int | None = None) -> list[float]:
    """Train ``model`` for ``epochs`` epochs; returns the mean loss of every epoch.

    ``loss_fn(model, batch)`` returns a scalar; batches are moved to ``device`` first.
    AMP (bfloat16 autocast) is used on CUDA unless ``amp=False``; ``amp=True`` turns it on for
    the CPU as well (see :func:`use_amp`). On a GPU without bf16 (a T4) it is float16, with the loss
    scaled (``torch.amp.GradScaler``) so that small gradients do not underflow. With ``checkpoint``, the state is saved after every
    epoch and, if ``resume``, a saved state is resumed. In a dry run (:mod:`uadkit.dryrun`)
    training stops after 1 epoch of at most ``dryrun.MAX_STEPS`` steps, and its checkpoint is read back and
    deleted at the end.

    ``micro_batch``: gradient accumulation. Every batch is cut into parts of at most that many items
    (:func:`split_batch`); each part's loss, weighted by its share of the batch, is back-propagated
    before the batch's one optimiser step. For a loss that is a mean over the batch's items this is the
    update of the whole batch, with the activations of one part in memory.
    """
    from . import dryrun

    model.to(device)
    amp_on = use_amp(device, amp)
    scaler = grad_scaler(device, amp_on)  # float16 (a GPU without bf16) needs its loss scaled
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
            optimizer.zero_grad(set_to_none=True)
            value = 0.0
            for part, share in split_batch(batch, micro_batch) if micro_batch else [(batch, 1.0)]:
                with autocast(device, amp_on):
                    loss = loss_fn(model, part)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} in epoch {epoch + 1}")
                scaler.scale(loss if share == 1.0 else loss * share).backward()
                value += loss.item() * share
            scaler.step(optimizer)  # optimizer.step(), skipped where float16 gradients overflowed
            scaler.update()
            total, count = total + value, count + 1
        if scheduler is not None:
            scheduler.step()
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)  # a redraw per epoch would defeat mininterval
        if path is not None:
            extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
            if gen is not None:
                extra["loader_rng"] = gen.get_state()
            if settings is not None:
                extra["fingerprint"] = settings
            save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1,
                            history=history, rng=_rng_state(), **extra)
    if path is not None and dryrun.active() and path.is_file():
        # a dry run reads its checkpoint back, then deletes it: no dry run resumes a training, and the
        # checkpoints of all its paper-size trainings would take over 10 GB of disk
        load_checkpoint(path)
        path.unlink()
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
