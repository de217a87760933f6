"""Identity encoders (ArcFace IResNet, CLIP vision), IPS, mask crops and the nodes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def id_lib():
    from xmgie.mgie_core.models import identity

    return identity


@pytest.fixture(scope="module")
def encoders(tiny_models, id_lib):
    return {
        "face_recognition": id_lib.load_face_recognition(
            str(tiny_models("face_recognition")), device="cpu"),
        "clip_vision": id_lib.load_clip_vision(str(tiny_models("clip_vision")), device="cpu"),
    }


def _images(b=2, h=64, w=80, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


# --- IResNet ------------------------------------------------------------------------

@pytest.mark.parametrize("layers,width,features", [
    ((1, 1, 1, 1), 8, 32),
    ((2, 1, 3, 1), 4, 16),
])
def test_iresnet_config_round_trips(layers, width, features):
    from xmgie.mgie_core.models import iresnet

    config = iresnet.IResNetConfig(layers=layers, width=width, num_features=features)
    sd = iresnet.IResNet(config).state_dict()
    assert iresnet.infer_config(sd) == config
    model = iresnet.IResNet(iresnet.infer_config(sd))
    model.load_state_dict(sd, strict=True)
    out = model.eval()(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, features)


@pytest.mark.parametrize("layers,name", [((3, 4, 14, 3), "iresnet50"),
                                        ((3, 13, 30, 3), "iresnet100")])
def test_iresnet_published_layout(layers, name):
    """Key names and shapes of arcface_torch's backbone.pth (shapes only, on meta)."""
    from xmgie.mgie_core.models import iresnet

    with torch.device("meta"):
        sd = iresnet.IResNet(iresnet.IResNetConfig(layers=layers)).state_dict()
    config = iresnet.infer_config(sd)
    assert config.layers == layers and config.width == 64 and config.name == name
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["conv1.weight"] == (64, 3, 3, 3)
    assert shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert shapes["layer2.0.downsample.1.running_var"] == (128,)
    assert shapes["layer4.0.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["layer3.1.bn3.weight"] == (256,)
    assert "layer3.1.downsample.0.weight" not in shapes
    assert shapes["bn2.weight"] == (512,)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7)
    assert shapes["features.running_mean"] == (512,)
    assert {k.split(".")[0] for k in sd} == {"conv1", "bn1", "prelu", "layer1", "layer2",
                                              "layer3", "layer4", "bn2", "fc", "features"}


# --- loaders ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["face_recognition", "clip_vision"])
def test_load_by_name_from_models_dir(kind, tiny_models, clean_paths, id_lib):
    path = tiny_models(kind)
    clean_paths.configure(models_dir=path.parent.parent)
    enc = id_lib.load_identity_encoder(kind, path.name, device="cpu")
    assert enc.kind == kind and enc.path == path
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert not enc.model.training


def test_clip_preprocessing_read_from_folder(encoders):
    from xmgie.mgie_core.tiny.identity import TINY_CLIP_IMAGE_SIZE

    enc = encoders["clip_vision"]
    assert enc.size == (TINY_CLIP_IMAGE_SIZE, TINY_CLIP_IMAGE_SIZE)
    assert enc.resize_shortest == TINY_CLIP_IMAGE_SIZE
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert enc.interpolation == "bicubic"
    face = encoders["face_recognition"]
    assert face.size == (112, 112) and face.mean == (0.5, 0.5, 0.5) and face.std == (0.5,) * 3


def test_clip_embeds_match_transformers(encoders, tiny_models):
    from transformers import CLIPVisionModelWithProjection

    enc = encoders["clip_vision"]
    ref = CLIPVisionModelWithProjection.from_pretrained(tiny_models("clip_vision")).eval()
    x = _images(b=1, h=48, w=32)
    with torch.no_grad():
        pixels = enc.preprocess(x)
        want = torch.nn.functional.normalize(ref(pixel_values=pixels).image_embeds, dim=-1)
        assert pixels.shape == (1, 3, 32, 32)
        assert torch.allclose(enc.embed(x), want, atol=1e-6)


def test_whole_clip_model_folder_loads(tmp_path, id_lib):
    """A whole CLIP repository (e.g. openai/clip-vit-large-patch14) serves as the encoder:
    its vision tower and visual projection, at the top-level projection_dim."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=49408),
                        vision_config=dict(tower, image_size=32, patch_size=8),
                        projection_dim=24)
    torch.manual_seed(0)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "clip")
    with pytest.warns(UserWarning, match="preprocessor_config"):
        enc = id_lib.load_clip_vision(str(tmp_path / "clip"), device="cpu")
    x = _images(b=1, h=32, w=32)
    with torch.no_grad():
        want = full.get_image_features(pixel_values=enc.preprocess(x))
        want = getattr(want, "pooler_output", want)
        assert enc.embed(x).shape == (1, 24)
        assert torch.allclose(enc.embed(x), torch.nn.functional.normalize(want, dim=-1),
                              atol=1e-6)


def test_face_recognition_safetensors_and_module_prefix(tiny_models, tmp_path, id_lib,
                                                        encoders):
    from safetensors.torch import save_file

    sd = torch.load(tiny_models("face_recognition"), map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "r.safetensors"))
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    x = _images(b=1)
    with torch.no_grad():
        want = encoders["face_recognition"].embed(x)
        for name in ("r.safetensors", "ddp.pth"):
            enc = id_lib.load_face_recognition(str(tmp_path / name), device="cpu")
            assert torch.allclose(enc.embed(x), want, atol=1e-6)


@pytest.mark.parametrize("kind,folder,site", [
    ("face_recognition", "face_recognition", "insightface"),
    ("clip_vision", "clip_vision", "huggingface.co/openai/clip-vit-large-patch14"),
])
def test_missing_model_names_every_folder(kind, folder, site, tmp_path, clean_paths, id_lib):
    from xmgie.mgie_core.errors import ModelNotFoundError

    dirs = [tmp_path / "a", tmp_path / "b"]
    clean_paths.configure(models_dir=dirs)
    with pytest.raises(ModelNotFoundError) as e:
        id_lib.load_identity_encoder(kind, "nothing-here")
    msg = str(e.value)
    for d in dirs:
        assert str(d / folder / "nothing-here") in msg
    assert site in msg


@pytest.mark.parametrize("change", ["drop", "extra", "shape", "not_iresnet"])
def test_bad_face_state_dict_is_a_load_error(change, tiny_models, tmp_path, id_lib):
    from xmgie.mgie_core.errors import ModelLoadError

    sd = torch.load(tiny_models("face_recognition"), map_location="cpu", weights_only=True)
    if change == "drop":
        del sd["layer2.0.bn2.running_var"]
    elif change == "extra":
        sd["head.weight"] = torch.zeros(3)
    elif change == "shape":
        sd["prelu.weight"] = torch.zeros(5)
    else:
        sd = {"encoder.weight": torch.zeros(3, 3)}
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ModelLoadError) as e:
        id_lib.load_face_recognition(str(bad), device="cpu")
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("change", ["drop_projection", "model_type"])
def test_bad_clip_folder_is_a_load_error(change, tiny_models, tmp_path, id_lib):
    from safetensors.torch import load_file, save_file

    from xmgie.mgie_core.errors import ModelLoadError

    folder = tmp_path / "clip"
    shutil.copytree(tiny_models("clip_vision"), folder)
    if change == "drop_projection":
        sd = load_file(str(folder / "model.safetensors"))
        del sd["visual_projection.weight"]
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "siglip_vision_model"
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        id_lib.load_clip_vision(str(folder), device="cpu")
    assert str(folder) in str(e.value)
    assert ("visual_projection" if change == "drop_projection" else "siglip") in str(e.value)


def test_unknown_kind(id_lib):
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError, match="face_recognition"):
        id_lib.load_identity_encoder("dino", "x")


# --- embeddings and IPS -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["face_recognition", "clip_vision"])
def test_embed_is_normalised_and_differentiable(kind, encoders, id_lib):
    enc = encoders[kind]
    x = _images().requires_grad_(True)
    e = enc.embed(x)
    assert e.shape[0] == 2 and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    target = enc.embed(_images(seed=5)).detach()
    loss = (1 - (e * target).sum(-1)).sum()  # identity-guidance style loss
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        same = id_lib.ips(enc, x, x)
    assert same.shape == (2,) and torch.allclose(same, torch.ones(2), atol=1e-5)


def test_ips_broadcasts_one_source(encoders, id_lib):
    from xmgie.mgie_core.errors import InputError

    enc = encoders["face_recognition"]
    edited, source = _images(b=3), _images(b=1, seed=7)
    with torch.no_grad():
        s = id_lib.ips(enc, edited, source)
        assert s.shape == (3,) and (s <= 1 + 1e-5).all() and (s >= -1 - 1e-5).all()
        assert s[1] == pytest.approx(float(id_lib.ips(enc, edited[1:2], source)), abs=1e-5)
        with pytest.raises(InputError):
            id_lib.ips(enc, edited, _images(b=2))


def test_crop_to_mask(id_lib):
    from xmgie.mgie_core.errors import InputError

    img = _images(b=2, h=50, w=60).requires_grad_(True)
    mask = torch.zeros(50, 60)
    mask[10:20, 30:50] = 1
    crop = id_lib.crop_to_mask(img, mask, margin=0.0)
    assert crop.shape == (2, 10, 20, 3)
    assert torch.equal(crop, img[:, 10:20, 30:50])
    # +5 rows and +10 columns on each side (half the box), the right edge clipped at 60
    assert id_lib.crop_to_mask(img, mask, margin=0.5).shape == (2, 20, 40, 3)
    assert id_lib.crop_to_mask(img[0], mask[None], margin=10).shape == (50, 60, 3)  # clipped
    crop.sum().backward()
    assert img.grad.abs().sum() > 0
    with pytest.raises(InputError, match="empty"):
        id_lib.crop_to_mask(img, torch.zeros(50, 60))
    with pytest.raises(InputError, match="size"):
        id_lib.crop_to_mask(img, torch.ones(40, 60))


# --- nodes --------------------------------------------------------------------------

def test_nodes(tiny_models, clean_paths):
    from xmgie.nodes import identity as id_nodes

    for cls in id_nodes.NODES:
        assert cls.NODE_ID.startswith("XMGIE") and cls.CATEGORY.startswith("xmgie/")
        assert cls.DISPLAY_NAME and cls.DESCRIPTION and cls.FUNCTION
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{cls.NODE_ID}.{name} has no tooltip"

    face, clip = tiny_models("face_recognition"), tiny_models("clip_vision")
    clean_paths.configure(models_dir=face.parent.parent)
    names = id_nodes.LoadIdentityEncoder.INPUT_TYPES()["required"]["model_name"][0]
    assert face.name in names and clip.name in names
    for kind, name in (("face_recognition", face.name), ("clip_vision", clip.name)):
        (enc,) = id_nodes.LoadIdentityEncoder().load(kind, name)
        img = _images(b=2)
        ips, report = id_nodes.IdentityScore().score(enc, img, img)["result"]
        assert ips == pytest.approx(1.0, abs=1e-5) and kind in report
        mask = torch.zeros(1, 64, 80)
        mask[:, 10:50, 20:60] = 1
        ips, _ = id_nodes.IdentityScore().score(enc, img, _images(b=1, seed=9), mask, 0.1)["result"]
        assert -1.0 <= ips <= 1.0
