"""Photos of ordinary sizes: fitted to the model's size step and cropped back.

A 451x300 photo (neither side a multiple of 64) goes through every editing path with
the tiny models, at its own size: inversion + two-branch sampler + decode, the
instruction sampler + decode, the VAE nodes and the attention mask. ``fit`` = pad gives
the photo's exact size back, crop gives the centre crop, refuse names the size. The
masks are padded with zeros, so the padded border is background to every control.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmgie.mgie_core import images, sampler, vae
from xmgie.mgie_core.control import Control
from xmgie.mgie_core.errors import InputError
from xmgie.nodes.editing import (
    CAMSampler,
    EncodeInstruction,
    InstructSampler,
    Invert,
    MAGControlNode,
    PFBControlNode,
)
from xmgie.nodes.latents import VAEDecode, VAEEncode
from xmgie.nodes.masks import AttentionMask

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
H, W = 300, 451          # a photo's size; the model works at 320x512
STEPS = 3


@pytest.fixture(scope="module")
def photo():
    return torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def photo_mask():
    m = torch.zeros(1, H, W)
    m[:, 100:220, 150:330] = 1
    return m


def _invert(sd, photo, fit="pad"):
    inv, latent, _ = Invert().invert(sd, photo, SRC, "direct", STEPS, 7.5, 1, fit=fit)
    return inv, latent


class _Probe(Control):
    """Records the run's mask and a control's own mask as the control sees them."""

    name = "probe"

    def __init__(self, own=None):
        self.own = own

    def setup(self, run):
        self.run_mask = run.mask.clone()
        self.own_mask = self.resolve_mask(run, self.own, required=True, use="a test")


# --- the fit itself --------------------------------------------------------------------

def test_pad_reflects_and_crops_back_exactly(photo):
    fitted, fit = images.fit_image("image", photo, 64, "pad")
    assert tuple(fitted.shape) == (1, 320, 512, 3) and fit.size == (H, W)
    top, left = fit.offset
    assert torch.equal(fitted[:, top:top + H, left:left + W], photo)
    # reflected: the row above the photo mirrors its second row
    assert torch.equal(fitted[:, top - 1, left:left + W], photo[:, 1])
    assert torch.equal(fit.undo(fitted), photo)


def test_mask_is_padded_with_zeros_and_cut_back(photo, photo_mask):
    _, fit = images.fit_image("image", photo, 64, "pad")
    m = fit.mask(photo_mask)
    assert tuple(m.shape) == (1, 320, 512)
    assert float(m.sum()) == float(photo_mask.sum())       # nothing in the border
    assert torch.equal(fit.undo_mask(m), photo_mask)


def test_crop_is_centred_and_refuse_names_the_size(photo):
    fitted, fit = images.fit_image("image", photo, 64, "crop")
    assert tuple(fitted.shape[1:3]) == (256, 448)
    assert torch.equal(fitted, photo[:, 22:278, 1:449])
    with pytest.raises(InputError) as err:
        images.fit_image("image", photo, 64, "refuse")
    text = str(err.value)
    assert "451x300" in text and "multiples of 64" in text and "fit" in text
    with pytest.raises(InputError, match="fit"):
        images.fit_image("image", photo, 64, "stretch")


def test_a_photo_smaller_than_the_pad_still_pads_but_a_dot_is_refused():
    small = torch.rand(1, 12, 20, 3)
    fitted, fit = images.fit_image("image", small, 64, "pad")
    assert tuple(fitted.shape) == (1, 64, 64, 3)
    assert torch.equal(fit.undo(fitted), small)
    with pytest.raises(InputError, match="5x3 pixels, smaller than"):
        images.fit_image("image", torch.rand(1, 3, 5, 3), 64, "pad")


def test_model_step_is_64_for_sd(tiny_sd):
    assert vae.size_multiple(tiny_sd) == 64


# --- the editing paths -----------------------------------------------------------------

def test_two_branch_edit_of_a_451x300_photo_is_451x300(tiny_sd, photo, photo_mask):
    inv, latent = _invert(tiny_sd, photo)
    assert tuple(latent["samples"].shape[-2:]) == (40, 64)
    (controls,) = PFBControlNode().make(mask=photo_mask)
    probe = _Probe(own=photo_mask)
    edited, rec = _sample(tiny_sd, inv, photo_mask, controls + [probe])
    (image,) = VAEDecode().decode(tiny_sd, edited)
    (recon,) = VAEDecode().decode(tiny_sd, rec)
    assert tuple(image.shape) == (1, H, W, 3) and tuple(recon.shape) == (1, H, W, 3)
    # The run's mask and the control's own mask are the photo's, zero-padded alike.
    _, fit = images.fit_image("image", photo, 64, "pad")
    expected = fit.mask(photo_mask)
    assert torch.equal(probe.run_mask, expected)
    assert torch.equal(probe.own_mask, expected)
    top, left = fit.offset
    border = torch.ones(320, 512, dtype=torch.bool)
    border[top:top + H, left:left + W] = False
    assert not bool(probe.run_mask[0][border].any())


def _sample(sd, inv, mask, controls, cam_words="yellow", **kw):
    out = CAMSampler().sample(sd, inv, TGT, cam_words, "", "logits", 0.8, 0.5, True,
                              mask=mask, controls=controls, **kw)
    res = out["result"] if isinstance(out, dict) else out
    return res[0], res[1]


def test_crop_gives_the_centre_crop_and_refuse_a_clear_error(tiny_sd, photo, photo_mask):
    inv, _ = _invert(tiny_sd, photo, fit="crop")
    edited, _ = _sample(tiny_sd, inv, photo_mask, [])
    (image,) = VAEDecode().decode(tiny_sd, edited)
    assert tuple(image.shape) == (1, 256, 448, 3)
    with pytest.raises(InputError) as err:
        _invert(tiny_sd, photo, fit="refuse")
    assert "451x300" in str(err.value) and "pad" in str(err.value)


def test_a_mask_of_another_size_is_refused_by_the_sampler(tiny_sd, photo):
    inv, _ = _invert(tiny_sd, photo)
    with pytest.raises(InputError) as err:
        _sample(tiny_sd, inv, torch.ones(1, 128, 128), [])
    assert "mask" in str(err.value) and "451x300" in str(err.value)


def test_instruction_edit_of_a_451x300_photo_is_451x300(tiny_ip2p, photo, photo_mask):
    (cond,) = EncodeInstruction().encode(tiny_ip2p, "make the carpet yellow")
    (controls,) = PFBControlNode().make(mask=photo_mask)
    out = InstructSampler().sample(tiny_ip2p, photo, cond, STEPS, 7.5, 1.5, 0, "carpet",
                                   True, mask=photo_mask, controls=controls)
    edited = (out["result"] if isinstance(out, dict) else out)[0]
    (image,) = VAEDecode().decode(tiny_ip2p, edited)
    assert tuple(image.shape) == (1, H, W, 3)
    with pytest.raises(InputError, match="451x300"):
        InstructSampler().sample(tiny_ip2p, photo, cond, STEPS, 7.5, 1.5, 0, "", True,
                                 fit="refuse")


def test_library_instruction_photo_path_crops_back(tiny_ip2p, photo):
    cond = sampler.encode_instruction(tiny_ip2p, "make the carpet yellow")
    res = sampler.edit_instruct_photo(tiny_ip2p, photo, cond, steps=2)
    assert res.fit is not None and res.fit.size == (H, W)
    assert tuple(vae.decode(tiny_ip2p, res.edit, fit=res.fit).shape) == (1, H, W, 3)


def test_vae_nodes_round_trip_a_photo_at_its_size(tiny_sd, photo):
    (latent,) = VAEEncode().encode(tiny_sd, photo)
    assert tuple(latent["samples"].shape[-2:]) == (38, 57)      # 304x456: the VAE's 8 px
    (image,) = VAEDecode().decode(tiny_sd, latent)
    assert tuple(image.shape) == (1, H, W, 3)
    # A node that resized the latent and copied the dict along: the stale fit is ignored.
    resized = dict(latent, samples=torch.zeros(1, 4, 16, 16))
    (image,) = VAEDecode().decode(tiny_sd, resized)
    assert tuple(image.shape) == (1, 128, 128, 3)
    with pytest.raises(InputError, match="451x300"):
        VAEEncode().encode(tiny_sd, photo, fit="refuse")


def test_attention_mask_of_a_451x300_photo_is_451x300(tiny_sd, photo):
    mask, heat = AttentionMask().run(tiny_sd, photo, SRC, "carpet", 0.5, 0)
    assert tuple(mask.shape) == (1, H, W) and tuple(heat.shape) == (1, H, W, 3)


def test_sam_segment_finds_the_plans_object_in_a_451x300_photo(tiny_sd, tiny_models, photo):
    """SAM Segment's attention path (no points, a plan: the object's attention box prompts
    SAM) pads for the UNet in the library, like Attention Mask, and segments the photo
    at its own size."""
    from xmgie.mgie_core import masks as masks_lib
    from xmgie.mgie_core.models import sam as sam_lib
    from xmgie.mgie_core.plan_rules import plan_from_prompts
    from xmgie.nodes.sam import SAMSegment

    amap = masks_lib.attention_map(tiny_sd, photo, SRC, "carpet")
    assert tuple(amap.shape) == (H, W)
    sam = sam_lib.load_sam(str(tiny_models("sam")), device="cpu")
    plan = plan_from_prompts("make the carpet yellow", SRC, TGT)
    (mask,) = SAMSegment().segment(photo, sam, "", "", "", False, plan=plan, sd_model=tiny_sd)
    assert tuple(mask.shape) == (1, H, W)


def test_mag_own_mask_of_the_photo_is_accepted(tiny_sd, photo, photo_mask):
    inv, _ = _invert(tiny_sd, photo)
    (controls,) = MAGControlNode().make(mask=photo_mask, words="yellow", iterations=1,
                                        opt_fraction=0.4)
    edited, _ = _sample(tiny_sd, inv, None, controls, cam_words="")
    (image,) = VAEDecode().decode(tiny_sd, edited)
    assert tuple(image.shape) == (1, H, W, 3)


# --- through xmgie run and xmgie batch, as a user would ----------------------------------

ROOT = Path(__file__).resolve().parent.parent
YELLOW = ROOT / "workflows" / "api" / "edit_carpet_yellow_api.json"


def _photos(folder: Path, sizes) -> list[str]:
    """The shipped carpet photo and mask at each (width, height); their names."""
    folder.mkdir(parents=True, exist_ok=True)
    src = ROOT / "workflows" / "inputs"
    names = []
    for w, h in sizes:
        name = f"carpet_{w}x{h}"
        Image.open(src / "carpet.png").convert("RGB").resize((w, h)).save(folder / f"{name}.png")
        Image.open(src / "carpet_mask.png").convert("L").resize((w, h)).save(
            folder / f"{name}_mask.png")
        names.append(name)
    return names


def _run(tmp_path, *extra, workflow=YELLOW):
    from xmgie import cli

    (name,) = _photos(tmp_path / "in", [(513, 301)])
    out = tmp_path / "out"
    code = cli.main(["run", str(workflow), "--tiny", "--input-dir", str(tmp_path / "in"),
                     "--output-dir", str(out), "--set", f"1.image={name}.png",
                     "--set", f"2.image={name}_mask.png", "--set", "4.steps=2", *extra])
    return code, sorted(out.glob("*.png"))


def test_a_513x301_photo_under_tiny_is_edited_at_its_loaded_size(tmp_path, tiny_env, capsys):
    # --tiny loads it at 128x72 (longest side 128, sides multiples of 8): not a multiple
    # of the UNet's 64 px step, which used to end in a tensor size mismatch in the sampler.
    code, files = _run(tmp_path)
    err = capsys.readouterr().err
    assert code == 0, err
    (png,) = files
    with Image.open(png) as im:
        assert im.size == (128, 72)


def test_a_workflow_saved_without_fit_pads(tmp_path, tiny_env, capsys):
    api = json.loads(YELLOW.read_text())
    for node in api.values():
        node["inputs"].pop("fit", None)
    saved = tmp_path / "saved_before_fit.json"
    saved.write_text(json.dumps(api))
    code, files = _run(tmp_path, workflow=saved)
    assert code == 0, capsys.readouterr().err
    with Image.open(files[0]) as im:
        assert im.size == (128, 72)


def test_a_513x301_photo_with_fit_refuse_names_the_size(tmp_path, tiny_env, capsys):
    code, files = _run(tmp_path, "--set", "4.fit=refuse")
    err = capsys.readouterr().err
    assert code == 1 and files == []
    assert "XMGIEInvert" in err and "128x72" in err and "fit" in err
    assert "Traceback" not in err and "RuntimeError" not in err


def test_batch_edits_photos_of_ordinary_sizes(tmp_path, tiny_env, capsys):
    from xmgie import cli

    data = tmp_path / "ds"
    sizes = [(451, 300), (640, 427)]
    names = _photos(data, sizes)
    rows = [{"id": n, "image": f"{n}.png", "mask": f"{n}_mask.png",
             "source_prompt": "a photo of a red carpet",
             "target_prompt": "a photo of a yellow carpet", "edit_words": ["yellow"]}
            for n in names]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code = cli.main(["batch", str(YELLOW), "--dataset", str(data), "--tiny",
                     "--set", "4.steps=1", "--out", str(run)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    for n, size in zip(names, sizes, strict=True):
        rec = json.loads((run / "items" / n / "record.json").read_text())
        assert rec["status"] == "ok", rec
        with Image.open(run / "items" / n / rec["outputs"][0]["file"]) as im:
            assert im.size == size      # the photo's exact size
