"""MemMC-MAE: masking, the memory of Eq. (1), the gates of Eq. (3), the masked loss, MS-SSIM, training,
and the paper-profile loaders (Covid-X, Hyper-Kvasir) on fake folder trees."""
import numpy as np
import pytest
import torch
from PIL import Image

import uadkit.models
from uadkit.data import DatasetUnavailable, UnknownDataset, get_dataset
from uadkit.models import memmc_mae as M


def _config(**kw):
    base = dict(patch=4, dim=16, depth=2, heads=2, decoder_dim=8, decoder_depth=2, decoder_heads=2, mlp_ratio=2.0,
                memory_slots=5, ssim_scales=2, ssim_window=5)
    return M.MemMCConfig(**{**base, **kw})


def test_patchify_roundtrip_and_positions():
    x = torch.rand(2, 3, 16, 16)
    p = M.patchify(x, 4)
    assert p.shape == (2, 16, 48)
    assert torch.equal(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).flatten())  # token 1 = row 0, column 1
    assert torch.equal(M.unpatchify(p, 4, (4, 4)), x)
    pos = M.sincos_pos_embed_2d(16, (4, 4))
    assert pos.shape == (16, 16) and len({tuple(r.tolist()) for r in pos}) == 16  # every position distinct


def test_masking_keeps_exactly_a_quarter_visible():
    g = torch.Generator().manual_seed(0)
    keep, mask = M.random_masking(64, 5, 0.75, generator=g)
    assert keep.shape == (5, 16) and mask.shape == (5, 64)
    assert torch.all(mask.sum(1) == 48)  # exactly 75 % masked, 25 % visible
    for b in range(5):
        assert len(set(keep[b].tolist())) == 16 and torch.all(mask[b, keep[b]] == 0)
    keep2, _ = M.random_masking(64, 5, 0.75, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(keep, keep2)  # another seed, another mask
    model = M.MemMCMAE(image_size=32, config=_config())
    latent, levels = model.encode(torch.rand(3, 3, 32, 32), M.random_masking(64, 3, 0.75)[0])
    assert latent.shape == (3, 16, 16) and len(levels) == 2  # the encoder sees the 16 visible tokens only


def test_encoder_attention_has_n_plus_memory_keys():
    attn = M.MemoryAttention(dim=16, heads=2, slots=5)
    out, w = attn.attention(torch.rand(3, 7, 16))
    assert out.shape == (3, 7, 16) and w.shape == (3, 2, 7, 7 + 5)  # keys: N tokens + 5 memory rows
    assert torch.allclose(w.sum(-1), torch.ones(3, 2, 7))
    assert w[..., 7:].sum() > 0  # the memory is attended to
    plain = M.MemoryAttention(dim=16, heads=2, slots=0)
    assert plain.attention(torch.rand(3, 7, 16))[1].shape == (3, 2, 7, 7) and plain.memory_k is None
    model = M.MemMCMAE(image_size=32, config=_config())
    assert model.encoder[0].attn.memory_k.shape == (5, 16) and model.encoder[1].attn.memory_v.shape == (5, 16)
    mae = M.MemMCMAE(image_size=32, config=_config(memory=False, multi_level=False))
    assert all(b.attn.slots == 0 for b in mae.encoder) and isinstance(mae.decoder[0], M.DecoderBlock)


def test_memory_changes_the_output_of_the_same_tokens():
    attn = M.MemoryAttention(dim=8, heads=2, slots=3)
    x = torch.rand(1, 4, 8)
    before = attn(x)
    with torch.no_grad():
        attn.memory_v.add_(1.0)
    assert not torch.allclose(before, attn(x))


def test_gates_are_in_zero_one_and_one_per_level():
    block = M.MultiLevelDecoderBlock(dim=8, heads=2, mlp_ratio=2.0, encoder_dim=16, levels=3)
    levels = [torch.randn(2, 4, 16) * 5 for _ in range(3)]
    y = block(torch.randn(2, 10, 8) * 5, levels)
    assert y.shape == (2, 10, 8) and block.last_gates.shape == (2, 10, 3)
    assert torch.all(block.last_gates > 0) and torch.all(block.last_gates < 1)
    y.sum().backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in block.gates)


def test_decoder_reads_every_encoder_level():
    model = M.MemMCMAE(image_size=32, config=_config(depth=3, decoder_depth=1))
    keep, _ = M.random_masking(64, 2, 0.75, generator=torch.Generator().manual_seed(0))
    latent, levels = model.encode(torch.rand(2, 3, 32, 32), keep)
    levels = [lvl.detach().requires_grad_() for lvl in levels]
    model.decode(latent.detach(), levels, keep).sum().backward()
    assert all(lvl.grad.abs().sum() > 0 for lvl in levels)  # cross-attention into X(1), X(2), X(3)


def test_masked_mse_counts_masked_patches_only():
    target = torch.zeros(1, 4, 3)
    pred = torch.zeros(1, 4, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    pred[0, 0] = 2.0  # masked patch, error 4 per pixel
    pred[0, 2] = 100.0  # visible patch: must not count
    assert M.masked_mse(pred, target, mask).item() == pytest.approx((4 + 0) / 2)


def test_ms_ssim_and_mse_maps():
    x = torch.rand(2, 3, 32, 32)
    same = M.ms_ssim_map(x, x, scales=3, window=7)
    assert same.shape == (2, 1, 32, 32) and torch.allclose(same, torch.ones_like(same), atol=1e-5)
    y = x.clone()
    y[:, :, 8:16, 8:16] = 1 - y[:, :, 8:16, 8:16]
    err = 1 - M.ms_ssim_map(y, x, scales=3, window=7)
    assert err[:, :, 10:14, 10:14].mean() > 5 * err[:, :, 24:, 24:].mean()  # the error sits where y differs
    assert M.mse_map(y, x)[:, :, 24:, 24:].sum() == 0
    pm = M.patch_map(torch.arange(16.0).reshape(1, 1, 4, 4), 2)
    assert pm[0, 0, 0, 0] == pm[0, 0, 1, 1] == (0 + 1 + 4 + 5) / 4


def test_seed_average_counts_only_hidden_pixels():
    model = M.MemMCMAE(image_size=16, config=_config())
    x = torch.rand(2, 3, 16, 16)
    _, composite, pix = model.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(composite * (1 - pix), x * (1 - pix))  # visible patches are the original
    assert pix.mean() == 0.75
    one = M.seed_averaged_error(model, x, seeds=1, scores=("mse",))["mse"]
    assert torch.all(one[pix == 0] == 0) and torch.all(one[pix == 1] > 0)


def test_short_run_lowers_the_loss_and_resumes(tmp_path):
    train = get_dataset("mini/phantom", "train", n_train=24, image_size=32)
    kw = dict(progress=False, patch=8, dim=32, depth=2, decoder_dim=32, decoder_depth=1, epochs=15, batch_size=8,
              warmup_epochs=2)
    det = uadkit.models.create("memmc_mae", **kw).fit(train, checkpoint=tmp_path / "m.pt")
    assert det.history[-1] < 0.5 * det.history[0]
    again = uadkit.models.create("memmc_mae", **kw).fit(train, checkpoint=tmp_path / "m.pt")
    assert all(torch.equal(v, det.model.state_dict()[k]) for k, v in again.model.state_dict().items())
    test = get_dataset("mini/phantom", "test", n_train=24, n_test=3, n_anomalous=3, image_size=32)
    scores, maps = det.predict(test)
    assert scores.shape == (6,) and maps.shape == (6, 1, 32, 32) and torch.all(maps >= 0)
    both = det.predict_all(test, seeds=2)
    assert set(both) == {"ms-ssim", "mse"} and both["mse"][1].shape == (6, 1, 32, 32)
    assert torch.allclose(both["mse"][0], both["mse"][1].flatten(1).mean(1))  # image score = mean over patches


def test_profiles():
    smoke, paper = M.MemMCConfig.for_profile("smoke"), M.MemMCConfig.for_profile("paper")
    assert (paper.dim, paper.depth, paper.heads, paper.patch) == (768, 12, 12, 16)  # ViT-B/16
    assert (paper.lr, paper.weight_decay, paper.batch_size, paper.epochs) == (1.5e-3, 0.05, 256, 2000)
    assert paper.mask_ratio == smoke.mask_ratio == 0.75 and paper.mask_seeds == 10
    assert M.MemMCConfig.for_profile("smoke", memory=False).memory is False


# --------------------------------------------------------------------------- paper-profile data

def _img(path, value=120, size=20, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def make_covidx_tree(root):
    base = root / "covidx"
    rows = {"train": [("p1", "a.png", "negative"), ("p2", "b.png", "positive"), ("p3", "c.png", "negative")],
            "test": [("p4", "d.png", "positive"), ("p5", "e.png", "negative")]}
    for split, items in rows.items():
        for pid, f, label in items:
            _img(base / split / f, mode="L")
        (base / f"{split}.txt").write_text("".join(f"{p} {f} {lab} cohen\n" for p, f, lab in items))
    return base


def make_kvasir_tree(root, n_normal=5):
    base = root / "hyper-kvasir"
    lab = base / "labeled" / "labeled-images" / "lower-gi-tract"
    for i in range(n_normal):
        folder = ["anatomical-landmarks/cecum", "anatomical-landmarks/ileum", "quality-of-mucosal-views/bbps-2-3"][i % 3]
        _img(lab / folder / f"n{i}.jpg")
    _img(lab / "pathological-findings" / "polyps" / "x.jpg")  # not a normal class: ignored
    seg = base / "segmented" / "segmented-images"
    for i in range(2):
        _img(seg / "images" / f"p{i}.jpg", 200)
        m = np.zeros((20, 20), np.uint8)
        m[:10] = 255
        m[15:, :] = 3  # JPEG-like noise near 0: not anomalous
        (seg / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(seg / "masks" / f"p{i}.png")
    return base


def test_covidx_loader(tmp_path):
    make_covidx_tree(tmp_path)
    train = get_dataset("covidx/all", "train", root=tmp_path, image_size=16)
    test = get_dataset("covidx/all", "test", root=tmp_path, image_size=16)
    assert len(train) == 2 and train.labels.sum() == 0  # negatives only
    assert list(test.labels) == [1, 0] and not test.has_masks
    assert train[0]["image"].shape == (3, 16, 16)
    with pytest.raises(DatasetUnavailable, match="python -m uadkit.fetch covidx --root"):
        get_dataset("covidx/all", "train", root=tmp_path / "elsewhere")
    with pytest.raises(UnknownDataset, match="all"):
        get_dataset("covidx/cxr", "train", root=tmp_path)
    (tmp_path / "covidx" / "test" / "d.png").unlink()
    with pytest.raises(DatasetUnavailable, match="d.png"):
        get_dataset("covidx/all", "test", root=tmp_path)


def test_hyper_kvasir_loader(tmp_path):
    base = make_kvasir_tree(tmp_path)
    train = get_dataset("hyper-kvasir/all", "train", root=tmp_path, image_size=20, n_train=3)
    test = get_dataset("hyper-kvasir/all", "test", root=tmp_path, image_size=20, n_train=3)
    assert len(train) == 3 and train.labels.sum() == 0
    assert list(test.labels) == [0, 0, 1, 1] and test.has_masks
    assert not {r.image for r in train.records} & {r.image for r in test.records}
    mask = test[2]["mask"]
    assert mask.shape == (1, 20, 20) and mask.sum() == 200  # top half; the faint noise is not anomalous
    with pytest.raises(DatasetUnavailable, match="n_train"):
        get_dataset("hyper-kvasir/all", "train", root=tmp_path, n_train=1600)
    with pytest.raises(DatasetUnavailable, match="python -m uadkit.fetch hyper_kvasir --root"):
        get_dataset("hyper-kvasir/all", "train", root=tmp_path / "elsewhere")
    (base / "segmented" / "segmented-images" / "masks" / "p1.png").unlink()
    with pytest.raises(DatasetUnavailable, match="no mask"):
        get_dataset("hyper-kvasir/all", "test", root=tmp_path, n_train=3)


def test_paper_profile_on_a_fake_kvasir_tree(tmp_path):
    """The paper profile's code path (16-px patches, sine-cosine positions, memory, multi-level decoder)
    on a miniature Hyper-Kvasir tree; depth and widths shrunk so it runs in a second on a CPU."""
    make_kvasir_tree(tmp_path)
    train = get_dataset("hyper-kvasir/all", "train", root=tmp_path, image_size=32, n_train=3)
    test = get_dataset("hyper-kvasir/all", "test", root=tmp_path, image_size=32, n_train=3)
    det = uadkit.models.create("memmc_mae", profile="paper", device="cpu", progress=False, epochs=2, batch_size=2,
                               dim=48, depth=2, heads=4, decoder_dim=32, decoder_depth=2, decoder_heads=4,
                               mask_seeds=2, ssim_scales=2, ssim_window=5)
    assert det.config.patch == 16 and det.config.memory and det.config.multi_level
    scores, maps = det.fit(train).predict(test)
    assert scores.shape == (4,) and maps.shape == (4, 1, 32, 32) and torch.isfinite(maps).all()


def test_fetch_commands_fail_fast_offline(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    command = [sys.executable, "-m", "uadkit.fetch", "covidx", "--root", str(tmp_path)]
    cwd = Path(__file__).resolve().parents[1]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert out.returncode != 0 and "kaggle" in out.stderr.lower() and "train.txt" in out.stderr
    make_covidx_tree(tmp_path)
    assert subprocess.run(command, timeout=60, cwd=cwd).returncode == 0
    from uadkit.fetch import hyper_kvasir

    for url, _ in hyper_kvasir.SOURCES.values():
        assert url.startswith("https://datasets.simula.no/")


# --------------------------------------------------------------------------- mixed precision, memory, devices

def test_training_step_under_cpu_bf16_autocast():
    """CUDA AMP's path, on the CPU: decoder_embed gives bf16 tokens while the mask token and the memory
    are float32; the scatter into the mask tokens must not fail, and the loss must be float32."""
    from uadkit import train as T

    torch.manual_seed(0)
    model = M.MemMCMAE(image_size=32, config=_config())
    det = M.MemMCDetector(_config(), device="cpu", progress=False)
    x = torch.rand(3, 3, 32, 32)
    with T.autocast("cpu", True):
        pred = model(x, M.random_masking(model.n_tokens, 3, 0.75)[0])
        loss = det._loss(model, x, torch.Generator().manual_seed(0))
    assert pred.dtype == torch.bfloat16  # autocast is really on
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.encoder[0].attn.memory_k.grad.abs().sum() > 0  # the memory read-out is trained under AMP too
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fit_in_a_dry_run_uses_amp_and_reads_only_its_batches(monkeypatch):
    """In a dry run fit() trains under bf16 autocast on the CPU, 2 steps of DRY_RUN_BATCH images; the
    training images are read per batch, never all at once."""
    from uadkit import dryrun

    monkeypatch.setenv("UADKIT_DRY_RUN", "1")
    monkeypatch.setenv("UADKIT_DRY_RUN_AMP", "1")  # as on a CPU with bf16 instructions
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            reads.append(i)
            return self.base[i]

    train = Counting(get_dataset("mini/phantom", "train", n_train=64, image_size=32))
    det = M.MemMCDetector(_config(batch_size=16, epochs=3), device="cpu", progress=False).fit(train)
    assert len(det.history) == 1 and np.isfinite(det.history[0])  # 1 epoch, trained under autocast
    # Detector.fit's input check and dataset[0] there and in _fit, then MAX_STEPS batches and the one fit()
    # reads before it stops
    checked = M.MemMCDetector.CHECKED_ITEMS
    assert len(reads) <= checked + 2 + (dryrun.MAX_STEPS + 1) * M.DRY_RUN_BATCH < 64


@pytest.mark.paper_memory
def test_fit_memory_does_not_grow_with_the_training_set(tmp_path):
    """Peak memory of a paper-profile fit (ViT-B widths, 16-px patches, 224 px, dry-run caps; 2 + 2 layers
    so that it takes seconds) grows by less than 30 MB from 16 to 128 training images. Holding the images
    (128 × 3 × 224² float32 = 77 MB) measured about 60 MB more than 16 of them; reading per batch, 0-10 MB."""
    from memory import fit_peaks_mb

    small, large = fit_peaks_mb("memmc_mae", (16, 128), tmp_path, image_size=224, depth=2, decoder_depth=2)
    assert large - small < 30, f"peak memory {small:.0f} MB with 16 images, {large:.0f} MB with 128"


def test_a_training_step_and_a_prediction_on_the_meta_device():
    """Every tensor the method builds follows the images' device: on "meta" a CPU-built tensor would raise.
    (Random crops and masks are drawn on the CPU from a CPU generator and moved: the same masks on every device.)"""
    c = _config(mask_seeds=2)
    det = M.MemMCDetector(c, device="meta", progress=False)
    with torch.device("meta"):
        det.model = M.MemMCMAE(image_size=32, config=c)
    x = torch.ones(2, 3, 32, 32, device="meta")
    det.model.train()
    loss = det._loss(det.model, x, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.device.type == "meta" and det.model.embed.weight.grad.device.type == "meta"
    scores, maps = det._predict_batch(x)
    assert scores.shape == (2,) and maps.shape == (2, 1, 32, 32) and maps.device.type == "meta"
