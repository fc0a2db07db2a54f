"""The training loop: the loss falls, a resumed run equals an uninterrupted one, checkpoints load weights-only."""
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from uadkit import train


def _setup(seed=0):
    train.seed_everything(seed)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, loader


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).squeeze(1), y)


def test_loss_decreases():
    model, opt, loader = _setup()
    history = train.fit(model, loss_fn, loader, epochs=15, optimizer=opt, progress=False)
    assert len(history) == 15 and history[-1] < 0.2 * history[0]
    assert not model.training


def test_resume_gives_identical_weights(tmp_path):
    model, opt, loader = _setup()
    straight = train.fit(model, loss_fn, loader, epochs=3, optimizer=opt, progress=False)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = tmp_path / "run.pt"
    model, opt, loader = _setup()
    train.fit(model, loss_fn, loader, epochs=1, optimizer=opt, checkpoint=ckpt, progress=False)  # "interrupted"
    model, opt, loader = _setup()  # a fresh process: same data, fresh weights,
    torch.manual_seed(123)  # and another global RNG state, which the checkpoint must restore
    loader.generator.manual_seed(321)
    resumed = train.fit(model, loss_fn, loader, epochs=3, optimizer=opt, checkpoint=ckpt, progress=False)
    assert resumed == straight
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    state = train.load_checkpoint(ckpt)
    assert "python" in state["rng"]  # random.random() in a loss or augmentation resumes too
    assert state["epoch"] == 3 and not ckpt.with_suffix(".pt.tmp").exists()


def test_non_finite_loss_is_reported():
    model, opt, loader = _setup()
    try:
        train.fit(model, lambda m, b: torch.tensor(float("nan"), requires_grad=True), loader, epochs=1,
                  optimizer=opt, progress=False)
    except FloatingPointError as e:
        assert "nan" in str(e)
    else:
        raise AssertionError("a NaN loss must stop training")


def test_predict_concatenates_tuples():
    loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=3)
    a, b = train.predict(lambda batch: (batch[0] * 2, batch[0][:, None]), loader)
    assert torch.equal(a, torch.arange(10.0) * 2) and b.shape == (10, 1)


def test_pick_device_is_cpu_here_or_named():
    assert train.pick_device("cpu") == "cpu"
    assert train.pick_device() in ("cpu", "cuda", "mps")


def test_micro_batches_give_the_whole_batchs_update():
    """Gradient accumulation over parts of 6, 6 and 4 items: the same weights as whole batches of 16."""
    def run(micro):
        torch.manual_seed(0)
        x = torch.randn(64, 4)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        history = train.fit(model, loss_fn, loader, epochs=3, optimizer=opt, progress=False, micro_batch=micro)
        return history, [p.detach().clone() for p in model.parameters()]

    (h_whole, w_whole), (h_parts, w_parts) = run(None), run(6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w_whole, w_parts))
    assert all(abs(a - b) < 1e-6 for a, b in zip(h_whole, h_parts))


def test_split_batch_cuts_tensors_and_per_item_lists():
    batch = {"image": torch.arange(10).reshape(5, 2), "category": ["a", "b", "c", "d", "e"], "size": 64}
    parts = train.split_batch(batch, 2)
    assert [share for _, share in parts] == [0.4, 0.4, 0.2]
    assert parts[2][0]["image"].tolist() == [[8, 9]] and parts[1][0]["category"] == ["c", "d"]
    assert parts[0][0]["size"] == 64
    assert train.split_batch(batch, 8) == [(batch, 1.0)]


def test_a_changed_byte_in_a_checkpoint_is_refused(tmp_path):
    """torch.load itself reads a flipped byte inside a tensor without complaint; the stored checksum does not."""
    model, opt, loader = _setup()
    ckpt = tmp_path / "ck.pt"
    train.fit(model, loss_fn, loader, epochs=1, optimizer=opt, checkpoint=ckpt, progress=False)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="ck.pt.*(checksum|Delete the file)"):
        train.load_checkpoint(ckpt)


@pytest.mark.parametrize("seed", ["0", 1.5, -1, True])
def test_seed_must_be_an_integer(seed):
    with pytest.raises(TypeError, match="seed must be an integer"):
        train.seed_everything(seed)


def test_pin_cpu_fixes_the_thread_count_and_keeps_a_kernel_set_given_in_the_environment(monkeypatch):
    import torch
    before = torch.get_num_threads()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("UADKIT_THREADS", "1")
    try:
        assert train.pin_cpu() == 1
        assert os.environ["ATEN_CPU_CAPABILITY"] == "default"  # the caller's choice wins
        assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"  # unset ones are pinned
        monkeypatch.setenv("UADKIT_THREADS", "two")
        with pytest.raises(ValueError, match="UADKIT_THREADS"):
            train.pin_cpu()
        with pytest.raises(ValueError, match=">= 0"):
            train.pin_cpu(-1)
    finally:
        torch.set_num_threads(before)


def test_autocast_is_float16_only_on_a_gpu_without_bf16(monkeypatch):
    assert train.amp_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))  # a T4
    assert train.amp_dtype("cuda") == torch.float16 and train.amp_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))  # an A100
    assert train.amp_dtype("cuda:0") == torch.bfloat16


def test_the_loss_is_scaled_only_under_float16_autocast(monkeypatch):
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: made.append(enabled) or enabled)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))  # a T4: float16
    assert train.grad_scaler("cuda", True) and not train.grad_scaler("cuda", False)
    assert not train.grad_scaler("cpu", True)  # CPU autocast is bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))  # an H100: bf16
    assert not train.grad_scaler("cuda", True) and made == [True, False, False, False]


def test_a_disabled_scaler_passes_the_step_through():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    scaler = train.grad_scaler("cpu", True)
    loss = (w ** 2).sum()
    assert scaler.scale(loss) is loss
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(w.detach(), torch.zeros(2))  # w - 0.5 * 2w


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A disk without room: the error gives the size and the room left, no partial file stays, and the
    checkpoint of the last finished epoch is still there to resume from."""
    import errno
    from collections import namedtuple

    model, opt, loader = _setup()
    ckpt = tmp_path / "run.pt"
    train.fit(model, loss_fn, loader, epochs=1, optimizer=opt, checkpoint=ckpt, progress=False)
    before = ckpt.read_bytes()

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(OSError) as e:  # told before writing
        train.fit(model, loss_fn, loader, epochs=2, optimizer=opt, checkpoint=ckpt, progress=False)
    assert e.value.errno == errno.ENOSPC and str(ckpt) in str(e.value) and "1 MB free" in str(e.value)
    monkeypatch.undo()

    real_save = torch.save

    def fills_up(obj, f, *args, **kwargs):  # the disk fills up halfway through the file
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896 vs 790")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", fills_up)
    with pytest.raises(RuntimeError, match="cannot write checkpoint .*unexpected pos"):  # room left: not "full"
        train.fit(model, loss_fn, loader, epochs=2, optimizer=opt, checkpoint=ckpt, progress=False)
    frees = iter([10**9, 2**10])  # room before writing, none left when the write failed
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: usage(10**10, 0, next(frees)))
    with pytest.raises(OSError, match="unexpected pos") as e:
        train.fit(model, loss_fn, loader, epochs=2, optimizer=opt, checkpoint=ckpt, progress=False)
    assert e.value.errno == errno.ENOSPC and "Free some disk space" in str(e.value)
    assert ckpt.read_bytes() == before and not ckpt.with_suffix(".pt.tmp").exists()
    assert train.load_checkpoint(ckpt)["epoch"] == 1
