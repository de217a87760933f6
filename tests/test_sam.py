"""Segment Anything: loading (architecture read from the state dict), segmenting, nodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def sam_lib():
    from xmgie.mgie_core.models import sam

    return sam


@pytest.fixture(scope="module")
def tiny_sam(tiny_models, sam_lib):
    return sam_lib.load_sam(str(tiny_models("sam")), device="cpu")


def _image(h=96, w=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(h, w, 3, generator=g) * 0.2
    img[20:60, 40:100] += 0.7  # a bright rectangle to segment
    return img.clamp(0, 1)


# --- loading ------------------------------------------------------------------------

def test_load_by_name_from_models_dir(tiny_models, clean_paths, sam_lib):
    from xmgie.mgie_core.tiny.sam import TINY_ARCH

    path = tiny_models("sam")
    clean_paths.configure(models_dir=path.parent.parent)  # the tiny root is a models dir
    model = sam_lib.load_sam(path.name, device="cpu")
    assert model.path == path
    assert model.model_type == "custom"
    enc = model.sam.image_encoder
    assert enc.img_size == TINY_ARCH.img_size
    assert [b.window_size for b in enc.blocks] == [TINY_ARCH.window_size, 0]
    assert not any(p.requires_grad for p in model.sam.parameters())


def test_load_by_explicit_path_matches_file(tiny_models, clean_paths, sam_lib):
    path = tiny_models("sam")
    model = sam_lib.load_sam(str(path), device="cpu")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in model.sam.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_tiny_mode_resolves_any_name(tiny_models, clean_paths, sam_lib):
    path = tiny_models("sam")
    clean_paths.configure(tiny_root=path.parent.parent)
    assert sam_lib.load_sam("sam_vit_h_4b8939.pth", device="cpu").path == path


def test_missing_checkpoint_names_every_folder(tmp_path, clean_paths, sam_lib):
    from xmgie.mgie_core.errors import ModelNotFoundError

    dirs = [tmp_path / "a", tmp_path / "b"]
    clean_paths.configure(models_dir=dirs)
    with pytest.raises(ModelNotFoundError) as e:
        sam_lib.load_sam("sam_vit_b_01ec64.pth")
    msg = str(e.value)
    for d in dirs:
        assert str(d / "sams" / "sam_vit_b_01ec64.pth") in msg
    assert "github.com/facebookresearch/segment-anything" in msg


@pytest.mark.parametrize("change", ["drop", "extra", "arch_key", "shape"])
def test_bad_state_dict_is_a_load_error(change, tiny_models, tmp_path, sam_lib):
    from xmgie.mgie_core.errors import ModelLoadError

    sd = torch.load(tiny_models("sam"), map_location="cpu", weights_only=True)
    if change == "drop":
        del sd["mask_decoder.iou_token.weight"]
    elif change == "extra":
        sd["image_encoder.extra.weight"] = torch.zeros(1)
    elif change == "arch_key":
        del sd["image_encoder.patch_embed.proj.weight"]
    else:
        sd["mask_decoder.iou_prediction_head.layers.2.bias"] = torch.zeros(7)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ModelLoadError) as e:
        sam_lib.load_sam(str(bad), device="cpu")
    assert str(bad) in str(e.value)


def test_pickled_object_is_refused(tmp_path, sam_lib):
    from xmgie.mgie_core.errors import ModelLoadError

    bad = tmp_path / "pickled.pth"
    torch.save({"model": object()}, bad)  # not loadable with weights_only=True
    with pytest.raises(ModelLoadError, match="weights_only"):
        sam_lib.load_sam(str(bad), device="cpu")


@pytest.mark.parametrize("kind,dim,depth,heads,globals_", [
    ("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    ("vit_b", 768, 12, 12, (2, 5, 8, 11)),
])
def test_official_architectures_are_inferred(kind, dim, depth, heads, globals_, sam_lib):
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # shapes only, no memory
        official = sam_model_registry[kind]().state_dict()
        arch = sam_lib.infer_arch(official)
        rebuilt = sam_lib.build_sam(arch).state_dict()
    assert arch.model_type == kind
    assert (arch.embed_dim, arch.depth, arch.global_attn_indexes) == (dim, depth, globals_)
    assert (arch.img_size, arch.patch_size, arch.window_size) == (1024, 16, 14)
    assert arch.num_heads == heads
    assert arch.prompt_embed_dim == 256 and arch.decoder_mlp_dim == 2048
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in official.items()}


# --- segmenting ---------------------------------------------------------------------

def test_segment_returns_binary_mask_of_image_size(tiny_sam, sam_lib):
    img = _image()
    mask, score = sam_lib.segment(tiny_sam, img, points=[(70, 40), (5, 5)], labels=[1, 0])
    assert mask.shape == (96, 160) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(score, float)
    mask, _ = sam_lib.segment(tiny_sam, img, box=(0, 0, 160, 96), multimask=False)
    assert mask.shape == (96, 160)


def test_multimask_keeps_highest_predicted_iou(tiny_sam, sam_lib):
    from segment_anything import SamPredictor

    img = _image(seed=1)
    mask, score = sam_lib.segment(tiny_sam, img, points=[(70, 40)], multimask=True)
    predictor = SamPredictor(tiny_sam.sam)
    predictor.set_image((img * 255).round().to(torch.uint8).numpy())
    masks, scores, _ = predictor.predict(point_coords=np.array([[70.0, 40.0]]),
                                         point_labels=np.array([1]), multimask_output=True)
    assert masks.shape[0] == 3
    best = int(np.argmax(scores))
    assert score == pytest.approx(float(scores.max()), abs=1e-5)
    assert torch.equal(mask, torch.from_numpy(masks[best].astype(np.float32)))


@pytest.mark.parametrize("kwargs,input_name", [
    (dict(), "prompt"),
    (dict(points=[]), "prompt"),
    (dict(points=[(1, 1), (2, 2)], labels=[1]), "labels"),
    (dict(points=[(1, 1)], labels=[2]), "labels"),
    (dict(points=[(200, 10)]), "points"),
    (dict(points=[(10, -1)]), "points"),
    (dict(box=(0, 0, 170, 50)), "box"),
    (dict(box=(50, 50, 10, 60)), "box"),
    (dict(box=(1, 2, 3)), "box"),
])
def test_bad_prompts_raise_input_error(kwargs, input_name, tiny_sam, sam_lib):
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError) as e:
        sam_lib.segment(tiny_sam, _image(), **kwargs)
    assert e.value.input_name == input_name


def test_parse_prompt_text(sam_lib):
    from xmgie.mgie_core.errors import InputError

    assert sam_lib.parse_points("10,20; 30.5, 40") == [(10.0, 20.0), (30.5, 40.0)]
    assert sam_lib.parse_points("  ") == []
    assert sam_lib.parse_box("1, 2, 30, 40") == (1.0, 2.0, 30.0, 40.0)
    assert sam_lib.parse_box("") is None
    with pytest.raises(InputError):
        sam_lib.parse_points("10,20,30")
    with pytest.raises(InputError):
        sam_lib.parse_points("a,b")
    with pytest.raises(InputError):
        sam_lib.parse_box("1,2,3")


def test_percent_coordinates_follow_the_image_size(sam_lib):
    from xmgie.mgie_core.errors import InputError

    # x percentages of the width, y of the height; pixels and percentages may mix
    assert sam_lib.parse_points("50%,82%; 10, 25%", size=(512, 512)) == [(256.0, 419.84),
                                                                          (10.0, 128.0)]
    assert sam_lib.parse_points("50%,82%", size=(160, 96)) == [(80.0, 96 * 0.82)]
    assert sam_lib.parse_box("25%,0%,100%,50%", size=(160, 96)) == (40.0, 0.0, 160.0, 48.0)
    with pytest.raises(InputError) as e:          # a percentage needs an image size
        sam_lib.parse_points("50%,82%", "negative_points")
    assert e.value.input_name == "negative_points"
    with pytest.raises(InputError):
        sam_lib.parse_points("50%%,1")


@pytest.mark.parametrize("hw", [(128, 128), (96, 160), (400, 300)])
def test_node_percent_points_fit_small_photos(hw, tiny_models, clean_paths):
    """The points the shipped mask template uses ('50%,82%'; it once said '256,420' in
    512 px pixels) fit a --tiny 128 px photo and a photo under 421 px tall; the same
    pixel points are refused there with an error naming the input."""
    from xmgie.mgie_core.errors import InputError
    from xmgie.nodes import sam as sam_nodes

    path = tiny_models("sam")
    clean_paths.configure(models_dir=path.parent.parent)
    (model,) = sam_nodes.LoadSAM().load(path.name)
    images = _image(*hw)[None]
    (masks,) = sam_nodes.SAMSegment().segment(images, model, "50%,82%", "50%,29%", "", True)
    assert masks.shape == (1, *hw)
    with pytest.raises(InputError) as e:
        sam_nodes.SAMSegment().segment(images, model, "256,420", "256,150", "", True)
    assert e.value.input_name == "points" and "outside" in str(e.value)


# --- nodes --------------------------------------------------------------------------

def test_nodes(tiny_models, clean_paths):
    from xmgie.nodes import sam as sam_nodes

    for cls in sam_nodes.NODES:
        assert cls.NODE_ID.startswith("XMGIE") and cls.CATEGORY.startswith("xmgie/")
        assert cls.DISPLAY_NAME and cls.DESCRIPTION and cls.FUNCTION
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{cls.NODE_ID}.{name} has no tooltip"

    path = tiny_models("sam")
    clean_paths.configure(models_dir=path.parent.parent)
    assert path.name in sam_nodes.LoadSAM.INPUT_TYPES()["required"]["sam_name"][0]
    (model,) = sam_nodes.LoadSAM().load(path.name)
    images = torch.stack([_image(), _image(seed=3)])
    (masks,) = sam_nodes.SAMSegment().segment(images, model, "70,40", "5,5", "", True)
    assert masks.shape == (2, 96, 160) and masks.device.type == "cpu"
    (masks,) = sam_nodes.SAMSegment().segment(images, model, "", "", "30,10,110,70", False)
    assert masks.shape == (2, 96, 160)
