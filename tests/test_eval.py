"""xmgie eval: each metric against an independent computation (on random-weight metric
networks saved in their real layouts and loaded through the same loaders), a missing
network's error, and the batch -> eval --variants pipeline on the example photos."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_batch import WF, YELLOW, make_dataset

pytest.importorskip("torchmetrics")
pytest.importorskip("lpips")
pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory, tiny_root):
    """Tiny LPIPS AlexNet, FID Inception and CLIP, written once where --tiny finds them,
    and linked under their published names in a models folder, as a user lays them out."""
    from xmgie.evaluation import networks, tiny

    families = [networks.LPIPS_FAMILIES["alex"], networks.FID_INCEPTION, networks.CLIP_SCORE]
    tiny.ensure(tiny_root, [f.key for f in families])
    root = tmp_path_factory.mktemp("metric-models")
    for fam in families:
        (root / fam.folder).mkdir(exist_ok=True)
        (root / fam.folder / fam.default_names[0]).symlink_to(
            tiny_root / fam.folder / fam.tiny_name)
    return root


@pytest.fixture
def with_metric_models(metric_models, clean_paths):
    clean_paths.configure(models_dir=[metric_models])
    return metric_models


def _pair(seed=0, shape=(2, 3, 48, 40), noise=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(*shape, generator=g)
    return a, (a + noise * torch.randn(*shape, generator=g)).clamp(0, 1)


# --- pure math ---------------------------------------------------------------------------

def test_psnr_and_mse_by_formula():
    from xmgie.evaluation import metrics as M

    a, b = _pair()
    mse = ((a - b) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(M.mse(a, b), mse)
    torch.testing.assert_close(M.psnr(a, b), 10 * torch.log10(1 / mse))
    assert math.isinf(float(M.psnr(a, a)[0]))


def _ssim_map(x: np.ndarray, y: np.ndarray, pad_mode: str) -> np.ndarray:
    """Wang et al.'s SSIM map (Gaussian 11 x 11, sigma 1.5) of one channel."""
    from scipy.ndimage import correlate1d

    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    k /= k.sum()

    def blur(z):
        return correlate1d(correlate1d(z, k, axis=0, mode=pad_mode), k, axis=1, mode=pad_mode)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def test_ssim_against_the_formula_and_scikit_image():
    from skimage.metrics import structural_similarity

    from xmgie.evaluation import metrics as M

    a, b = _pair(1)
    ours = M.ssim(a, b)
    for i in range(a.shape[0]):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        # torchmetrics' (and PIE-Bench's) convention: reflect padding ("mirror" in scipy),
        # the whole map averaged.
        full = np.mean([_ssim_map(x[c], y[c], "mirror") for c in range(3)])
        assert float(ours[i]) == pytest.approx(full, abs=2e-5)
        # The same formula over the interior windows is scikit-image's SSIM.
        inner = np.mean([_ssim_map(x[c], y[c], "mirror")[5:-5, 5:-5] for c in range(3)])
        sk = structural_similarity(x.transpose(1, 2, 0), y.transpose(1, 2, 0), channel_axis=-1,
                                   data_range=1.0, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
        assert inner == pytest.approx(sk, abs=1e-6)


def test_background_metrics_follow_pie_bench():
    from xmgie.evaluation import metrics as M

    a, b = _pair(2)
    mask = torch.zeros(2, 1, 48, 40)
    mask[:, :, 10:30, 5:25] = 1
    ea, eb = M.background(a, b, mask)
    keep = 1 - mask
    torch.testing.assert_close(ea, a * keep)
    torch.testing.assert_close(M.mse(ea, eb), ((a - b) ** 2 * keep).flatten(1).mean(1))
    # Only the background counts: changing the edit region changes nothing.
    c = b.clone()
    c[:, :, 10:30, 5:25] = 0.5
    torch.testing.assert_close(M.psnr(*M.background(a, c, mask)), M.psnr(ea, eb))


# --- metric networks ---------------------------------------------------------------------

LPIPS_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
LPIPS_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _lpips_by_formula(backbone_file: Path, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 (Zhang et al. 2018) from its definition: AlexNet ReLU features of the
    scaled inputs, unit-normalised over channels, squared differences weighted by the
    released linear layers, averaged over space and summed over the five layers."""
    import lpips
    from torchvision.models import alexnet

    net = alexnet(weights=None)
    missing, unexpected = net.load_state_dict(torch.load(backbone_file, weights_only=True),
                                              strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    lins = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu",
                      weights_only=True)
    taps = (1, 4, 7, 9, 11)

    def feats(x):
        x = ((x * 2 - 1) - LPIPS_SHIFT) / LPIPS_SCALE
        out = []
        for i, layer in enumerate(net.features):
            x = layer(x)
            if i in taps:
                out.append(x.clone())
        return out

    with torch.no_grad():
        total = 0
        for k, (fa, fb) in enumerate(zip(feats(a), feats(b))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = lins[f"lin{k}.model.1.weight"]            # [1, C, 1, 1]
            total = total + ((na - nb) ** 2 * w).sum(1).mean((1, 2))
    return total


def test_lpips_matches_its_definition(with_metric_models):
    from xmgie.evaluation import metrics as M
    from xmgie.evaluation import networks

    model = networks.load_lpips("alex", device="cpu")
    assert model.path == with_metric_models / "metrics" / "alexnet-owt-7be5be79.pth"
    a, b = _pair(3, shape=(2, 3, 64, 64), noise=0.2)
    torch.testing.assert_close(M.lpips_distance(model, a, b),
                               _lpips_by_formula(model.path, a, b), rtol=1e-4, atol=1e-6)
    assert float(M.lpips_distance(model, a, a).abs().max()) < 1e-6


def _smooth_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
    return (up * 255).round().to(torch.uint8)


def test_fid_and_is_match_their_formulas(with_metric_models):
    from scipy import linalg

    from xmgie.evaluation import metrics as M
    from xmgie.evaluation import networks

    inception = networks.load_inception(fid_feature=64, device="cpu")
    real_f, _ = inception(_smooth_images(3, 0))
    fake_f, fake_logits = inception(_smooth_images(4, 1))
    assert real_f.shape == (3, 64) and fake_logits.shape == (4, 1008)

    def frechet(x, y):
        mu1, mu2 = x.mean(0), y.mean(0)
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        covmean = linalg.sqrtm(s1 @ s2).real
        return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))

    expected = frechet(real_f.numpy(), fake_f.numpy())
    assert M.fid(real_f, fake_f) == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert M.fid(real_f, real_f) == pytest.approx(0.0, abs=1e-3)

    logits = fake_logits.numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = (p * (np.log(p + 1e-30) - np.log(p.mean(0) + 1e-30))).sum(1)
    assert M.inception_score(fake_logits, splits=1)[0] == pytest.approx(np.exp(kl.mean()),
                                                                        rel=1e-6)


def test_clip_score_matches_the_embeddings(with_metric_models):
    from xmgie.evaluation import metrics as M
    from xmgie.evaluation import networks

    model, processor = networks.load_clip(device="cpu")
    images = list(_smooth_images(2, 4))
    texts = ["a red carpet", "a photo of a dog on the beach"]
    ours = M.clip_scores(model, processor, images, texts)
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(
            pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(ours, (100 * cos).clamp(min=0), rtol=1e-5, atol=1e-4)


def test_ips_uses_the_pack_identity_encoder(tiny_models, clean_paths):
    from xmgie.evaluation import metrics as M
    from xmgie.mgie_core.models import identity

    encoder = identity.load_clip_vision(str(tiny_models("clip_vision")), device="cpu")
    a, b = _pair(5, shape=(1, 3, 48, 48), noise=0.3)
    mask = torch.zeros(1, 1, 48, 48)
    mask[..., 8:30, 10:40] = 1
    crop = lambda x: identity.crop_to_mask(x.permute(0, 2, 3, 1), mask[:, 0], 0.1)  # noqa
    e, s = encoder.embed(crop(a)), encoder.embed(crop(b))
    torch.testing.assert_close(M.ips_scores(encoder, a, b, mask), (e * s).sum(-1))


def test_loaders_refuse_pickled_objects(tmp_path, clean_paths):
    import collections

    from xmgie.evaluation import networks
    from xmgie.mgie_core.errors import ModelLoadError

    (tmp_path / "metrics").mkdir()
    torch.save({"fc.weight": torch.zeros(2), "extra": collections.Counter(a=1)},
               tmp_path / "metrics" / "weights-inception-2015-12-05-6726825d.pth")
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelLoadError, match="Inception-v3 FID network"):
        networks.load_inception(device="cpu")


# --- xmgie eval --------------------------------------------------------------------------

def _small_run(tmp_path: Path) -> Path:
    from xmgie import cli

    data = make_dataset(tmp_path / "ds", sizes=(64, 64))
    run = tmp_path / "run"
    assert cli.main(["batch", str(WF / "api" / "vae_roundtrip_api.json"), "--dataset", str(data),
                     "--tiny", "--out", str(run)]) == 0
    return run


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """No torch hub or Hugging Face cache of this machine can supply a network."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_missing_metric_network_is_reported_and_the_rest_still_computed(
        tmp_path, tiny_env, isolated_caches, metric_models, capsys):
    from xmgie import cli

    run = _small_run(tmp_path)
    empty = tmp_path / "empty-models"
    empty.mkdir()
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--models-dir", str(empty), "--no-pictures"]) == 1
    err = capsys.readouterr().err
    assert "error: LPIPS not computed: AlexNet weights for LPIPS (torchvision layout) " \
           "'alexnet-owt-7be5be79.pth' was not found." in err
    assert str(empty / "metrics" / "alexnet-owt-7be5be79.pth") in err          # searched
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in err        # torch cache
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in err  # published
    assert "weights-inception-2015-12-05-6726825d.pth' was not found" in err
    table = json.loads((run / "eval" / "table.json").read_text())
    assert set(table["errors"]) == {"lpips", "bg_lpips", "fid", "is", "clip_score",
                                    "clip_score_edited", "ips"}
    assert table["metrics"] == ["psnr", "ssim", "mse", "bg_psnr", "bg_ssim", "bg_mse"]
    values = table["rows"][0]["values"]
    assert all(isinstance(values[m], (float, str)) for m in table["metrics"])
    md = (run / "eval" / "report.md").read_text()
    assert "## Not computed" in md and "alexnet-owt-7be5be79.pth" in md

    # With the networks in a models folder (IPS from the tiny identity encoder), all run.
    assert cli.main(["eval", str(run), "--models-dir", str(metric_models), "--no-pictures",
                     "--fid-feature", "64", "--ips-encoder",
                     f"clip_vision:{tiny_env / 'clip_vision' / 'tiny-clip-vision'}"]) == 0
    table = json.loads((run / "eval" / "table.json").read_text())
    assert table["errors"] == {} and len(table["metrics"]) == 13
    # The manifest's items carry no attribute annotations: AA is skipped, not failed.
    assert set(table["skipped"]) == {"aa", "aa_others", "aa_ceiling"}
    assert "no evaluated item is an attribute edit" in table["skipped"]["aa"]


def test_batch_then_eval_variants_on_the_example_photos(tmp_path, tiny_env, example_photos,
                                                         metric_models, capsys):
    """The acceptance run: xmgie batch on the example photos with the tiny models, then
    xmgie eval --variants: records, the ablation table and the pictures."""
    from xmgie import cli

    run = tmp_path / "run"
    assert cli.main(["batch", str(YELLOW), "--dataset", str(example_photos), "--tiny",
                     "--set", "4.steps=1", "--out", str(run)]) == 0
    ids = ["butterfly", "carpet", "cat_shirt", "corgi"]
    base = {i: json.loads((run / "items" / i / "record.json").read_text()) for i in ids}
    for i, rec in base.items():
        assert rec["status"] == "ok" and rec["inputs"]["image"] == str(example_photos / f"{i}.png")
        assert rec["mapped"]["6.cam_in_words"] == ", ".join(rec["inputs"]["edit_words"])
        # One inversion step (1 forward) and one batched sampling step (1 forward).
        assert rec["unet_passes"]["forward"] == 2 and rec["unet_passes"]["by_node"]["6"]
        assert rec["times"]["seconds"] > 0 and rec["settings"]["overrides"] == ["4.steps=1"]
    stamps = {i: (run / "items" / i / "record.json").stat().st_mtime_ns for i in ids}

    variants = WF / "variants" / "edit_carpet_yellow.json"
    code = cli.main(["eval", str(run), "--variants", str(variants), "--tiny",
                     "--fid-feature", "64"])
    out = capsys.readouterr().out
    assert code == 0, out
    # The empty variant is the base run, reused as it is.
    assert {i: (run / "items" / i / "record.json").stat().st_mtime_ns for i in ids} == stamps
    no_pfb = json.loads((run / "variants" / "no_pfb" / "batch.json").read_text())
    assert "5" not in no_pfb["prompt"] and "controls" not in no_pfb["prompt"]["6"]["inputs"]
    for name in ("no_pfb", "no_cam"):
        for i in ids:
            rec = json.loads((run / "variants" / name / "items" / i / "record.json").read_text())
            assert rec["status"] == "ok" and rec["seed"] == base[i]["seed"]
            assert rec["settings"]["variant"] == name
    no_cam = json.loads((run / "variants" / "no_cam" / "items" / "carpet" / "record.json"
                         ).read_text())
    assert "6.cam_in_words" not in no_cam["mapped"]  # the variant's "" wins

    ev = run / "eval"
    table = json.loads((ev / "table.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["full", "no_pfb", "no_cam"]
    assert table["errors"] == {} and len(table["metrics"]) == 13 and table["items"] == ids
    with open(ev / "table.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["variant", "n_items"] + table["metrics"]
    assert [r[0] for r in rows[1:]] == ["full", "no_pfb", "no_cam"]
    for row, jrow in zip(rows[1:], table["rows"]):
        for metric, text in zip(table["metrics"], row[2:]):
            value = jrow["values"][metric]
            assert value is not None and (value == "inf" or math.isfinite(value))
            assert text == (value if value == "inf" else f"{value:.4f}" if abs(value) < 1000
                            else f"{value:.1f}")
    md = (ev / "report.md").read_text()
    assert "| Variant | PSNR ↑ | SSIM ↑ | LPIPS ↓" in md
    pictures = [f"bar_{m}.png" for m in table["metrics"]] + [f"grid_{i}.png" for i in ids]
    for name in pictures:
        assert f"(pictures/{name})" in md
        with Image.open(ev / "pictures" / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert "Evaluated 4 item(s) x 3 row(s)." in out


def test_pie_bench_run_and_background_metrics_from_the_files(tmp_path, tiny_env, capsys):
    """A PIE-Bench mapping file through batch and eval: its run-length masks are written
    once, and the background MSE/PSNR equal a direct computation on the saved files."""
    from test_batch import make_pie_bench

    from xmgie import cli
    from xmgie.runner.dataset import load_dataset, pie_bench_mask

    folder, _ = make_pie_bench(tmp_path / "pie")
    run = tmp_path / "run"
    assert cli.main(["batch", str(WF / "api" / "vae_roundtrip_api.json"), "--dataset", str(folder),
                     "--tiny", "--out", str(run)]) == 0
    assert cli.main(["eval", str(run), "--metrics", "psnr,bg_mse,bg_psnr",
                     "--no-pictures"]) == 0
    table = json.loads((run / "eval" / "table.json").read_text())
    dataset = load_dataset(folder)
    mses = []
    for item in dataset:
        rec = json.loads((run / "items" / item.id / "record.json").read_text())
        mask_file = run / "masks" / f"{item.id}.png"
        assert rec["inputs"]["mask"] == str(mask_file.resolve())
        mask = np.asarray(Image.open(mask_file), dtype=np.float64) / 255
        np.testing.assert_array_equal(mask, pie_bench_mask(item.mask_rle))
        src = np.asarray(Image.open(item.fields["image"]).convert("RGB"), np.float64) / 255
        res = np.asarray(Image.open(run / "items" / item.id / rec["outputs"][0]["file"]),
                         np.float64) / 255
        mses.append((((res - src) * (1 - mask)[..., None]) ** 2).mean())
    values = table["rows"][0]["values"]
    assert values["bg_mse"] == pytest.approx(np.mean(mses), rel=1e-5)
    assert values["bg_psnr"] == pytest.approx(np.mean([10 * np.log10(1 / m) for m in mses]),
                                              rel=1e-5)


def test_clip_score_network_missing_a_weight_is_refused(tmp_path, clean_paths):
    """A CLIP folder without one of its weights never loads with that weight left random:
    the error names the folder's weights file and the key."""
    from safetensors.torch import load_file, save_file

    from xmgie.evaluation import networks, tiny
    from xmgie.mgie_core.errors import ModelLoadError

    folder = tmp_path / "clip_vision" / "clip-vit-large-patch14"
    tiny.make_clip(folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    dropped = next(k for k in state if k.startswith("visual_projection"))
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelLoadError, match="visual_projection") as info:
        networks.load_clip(device="cpu")
    assert "model.safetensors" in str(info.value)
