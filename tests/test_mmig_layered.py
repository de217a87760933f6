"""LayerDiffusion's layered edit (docs/algorithms.md section 15): the description split,
eq. 15's embedding optimisation, eq. 16's mix, the LoRA fine-tuning with eqs. 17-18, the
edit, and the mmig_layered_edit template, on the tiny SD model."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch

from xmgie.mgie_core import astar, layered, vae
from xmgie.mgie_core.diffusion import encode_prompt
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.plan import EditPlan

ROOT = Path(__file__).resolve().parent.parent
SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"


@pytest.fixture(scope="module")
def photo():
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    m = torch.zeros(1, 64, 64)
    m[:, 16:48, 24:56] = 1
    return img, m


@pytest.fixture(scope="module")
def prepared(tiny_sd, photo):
    """The photo's latent, its latent mask and the two optimised embeddings, shared."""
    img, m = photo
    lat = vae.encode_photo(tiny_sd, img)
    z0 = lat.samples
    lm = layered.latent_mask(m, tuple(z0.shape[-2:]))
    e_a = encode_prompt(tiny_sd, "a photo of a yellow carpet")
    e_b = encode_prompt(tiny_sd, "a photo of the scene in a room")
    ea, eb, report = layered.optimise_embeddings(tiny_sd, z0, lm, e_a, e_b, steps=12, lr=1e-2)
    return dict(lat=lat, z0=z0, lm=lm, e_a=e_a, e_b=e_b, ea=ea, eb=eb, report=report)


# --- the split, the losses, the mix --------------------------------------------------------

@pytest.mark.parametrize("target, words, obj, expected", [
    (TGT, ["yellow"], "carpet", ("a photo of a yellow carpet",
                                 "a photo of the scene in a room")),
    ("a yellow carpet", ["yellow carpet"], "carpet", ("a photo of a yellow carpet",
                                                       "the background")),
    ("a dog on the beach", ["beach"], "dog", ("a photo of a dog", "on the beach")),
])
def test_split_descriptions_from_the_plan(target, words, obj, expected):
    plan = EditPlan(source_prompt=SRC, target_prompt=target, edit_words=words, object=obj)
    assert layered.split_descriptions(plan) == expected


def test_split_refuses_a_plan_without_target_or_words():
    with pytest.raises(InputError, match="plan.target_prompt"):
        layered.split_descriptions(EditPlan(edit_words=["yellow"], object="carpet"))
    with pytest.raises(InputError, match="neither edit words nor an object"):
        layered.split_descriptions(EditPlan(target_prompt=TGT))


def test_losses_by_hand():
    eps = torch.zeros(1, 4, 2, 2)
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).expand(1, 4, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert layered.masked_noise_loss(eps, pred, m).item() == pytest.approx(1.0)
    mt = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    l_fg, l_bg = layered.layered_losses(eps, pred, mt, m)
    assert l_fg.item() == pytest.approx((1 + 4) / 2)             # inside M_t
    assert l_bg.item() == pytest.approx((4 + 9 + 16) / 3)        # outside M_r
    assert l_fg.dtype == l_bg.dtype == torch.float32
    with pytest.raises(InputError, match="selects no latent position"):
        layered.masked_noise_loss(eps, pred, torch.zeros(2, 2))
    # a batch of 4 masks [B,h,w] is one mask per row (not one per channel)
    e4 = torch.zeros(4, 4, 2, 2)
    p4 = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 4, 2, 2)     # row r predicts r
    m4 = torch.zeros(4, 2, 2)
    m4[3, 0, 0] = 1                                                   # only row 3's cell
    assert layered.masked_noise_loss(e4, p4, m4).item() == pytest.approx(9.0)
    with pytest.raises(InputError, match="mask"):
        layered.masked_noise_loss(e4, p4, torch.ones(3, 2, 2))


def test_mix_is_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    assert torch.equal(layered.mix_embeddings(a, b, 0.7), 0.7 * a + (1 - 0.7) * b)
    assert torch.equal(layered.mix_embeddings(a, b, 1.0), a)
    assert torch.equal(layered.mix_embeddings(a, b, 0.0), b)
    with pytest.raises(InputError, match="alpha"):
        layered.mix_embeddings(a, b, 1.5)
    with pytest.raises(InputError, match="embeddings"):
        layered.mix_embeddings(a, b[:, :10])


def test_bad_masks_get_clear_errors(photo):
    _, m = photo
    with pytest.raises(InputError, match="mask: is empty"):
        layered.latent_mask(torch.zeros(1, 64, 64), (8, 8))
    with pytest.raises(InputError, match="covers the whole image"):
        layered.latent_mask(torch.ones(1, 64, 64), (8, 8))
    with pytest.raises(InputError, match="is 48x64 pixels but the photo is 64x64"):
        layered.latent_mask(torch.ones(1, 64, 48), (8, 8))
    with pytest.raises(InputError, match="is 32x32 pixels"):      # divisible, still wrong
        layered.latent_mask(m[:, :32, :32], (8, 8))
    with pytest.raises(InputError, match="image_latents"):
        layered.optimise_embeddings(None, torch.zeros(1, 3, 8, 8), m, torch.zeros(1, 77, 8),
                                    torch.zeros(1, 77, 8))


# --- eq. 15 and the fine-tuning on the tiny model ---------------------------------------------

def test_nodes_check_their_inputs(tiny_sd, photo, prepared):
    from xmgie.nodes import mmig

    img, m = photo
    unmixed = layered.LayeredEmbeddings(prepared["ea"], prepared["eb"], "o", "b")
    with pytest.raises(InputError, match="are not mixed"):
        mmig.LayeredFineTune().finetune(tiny_sd, img, m, unmixed, 2, 1e-4, 4, 0.0, 0)
    with pytest.raises(InputError, match="mask: is 32x64 pixels but the photo is 64x64"):
        mmig.LayeredEmbeddingsNode().optimise(tiny_sd, img, m[:, :, :32], "o", "b", 2,
                                              1e-3, 0)
    plan = EditPlan(source_prompt=SRC, target_prompt=TGT, edit_words=["yellow"],
                    object="carpet")
    assert mmig.LayeredSplit().split(plan, "", "a sunny beach") == (
        "a photo of a yellow carpet", "a sunny beach")


def test_embedding_optimisation_lowers_eq15(tiny_sd, prepared):
    p = prepared
    before = layered.embedding_loss(tiny_sd, p["z0"], p["lm"], p["e_a"], p["e_b"])
    after = layered.embedding_loss(tiny_sd, p["z0"], p["lm"], p["ea"], p["eb"])
    assert after < before
    assert p["report"].get(layered.EMBEDDINGS).applied == 12
    assert p["ea"].dtype == torch.float32 and not p["ea"].requires_grad


def test_finetuning_lowers_both_losses_edits_inside_and_leaves_the_model(tiny_sd, photo,
                                                                        prepared):
    p = prepared
    img, m = photo
    e_opt = layered.mix_embeddings(p["ea"], p["eb"])
    weights = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    tuned, report = layered.finetune_lora(tiny_sd, p["z0"], p["lm"], e_opt, steps=12, lr=1e-3)
    # the user's UNet is unchanged, the new model has its own (merged, plain) UNet
    assert tuned.unet is not tiny_sd.unet and tuned.vae is tiny_sd.vae
    assert all(torch.equal(weights[k], v) for k, v in tiny_sd.unet.state_dict().items())
    assert not any("lora" in k for k in tuned.unet.state_dict())
    assert report.get(layered.FINETUNE).applied == 12
    fg0, bg0 = layered.layered_eval(tiny_sd, p["z0"], p["lm"], p["lm"], e_opt)
    fg1, bg1 = layered.layered_eval(tuned, p["z0"], p["lm"], p["lm"], e_opt)
    assert fg1 < fg0 and bg1 < bg0

    # the edit: it changes the photo inside the object more than outside
    res = layered.layered_edit(tuned, p["z0"], e_opt, source_prompt=SRC, target_prompt=TGT,
                               mask=m, steps=4, controls=[astar.AStarControl(["yellow",
                                                                              "carpet"])],
                               fit=p["lat"].fit)
    assert res.report.get("A-STAR").applied > 0
    source = vae.decode(tuned, p["z0"], fit=p["lat"].fit)
    edited = vae.decode(tuned, res.edit, fit=res.fit)
    diff = (edited - source).abs().mean(-1)[0]
    inside, outside = diff[m[0] > 0.5].mean().item(), diff[m[0] <= 0.5].mean().item()
    # pixels: the tiny VAE's decoder spreads an 8x8 latent's change far (measured 0.24
    # inside vs 0.14 outside at 64 px)
    assert inside > 1.5 * outside, (inside, outside)
    # latents: outside the object's cells the edit is the photo's latent (the background
    # layer is the reconstruction branch, exact under direct inversion)
    dz = (res.edit - p["z0"]).abs().mean(1, keepdim=True)
    assert dz[p["lm"] > 0.5].mean() > 0.05
    assert dz[p["lm"] <= 0.5].max() < 1e-5
    # what the fine-tuning itself changes: the same edit with the untuned model differs
    # inside the object (the tuned UNet draws the object layer) and nowhere outside
    base = layered.layered_edit(tiny_sd, p["z0"], e_opt, source_prompt=SRC,
                                target_prompt=TGT, mask=m, steps=4,
                                controls=[astar.AStarControl(["yellow", "carpet"])],
                                fit=p["lat"].fit)
    by_tuning = (res.edit - base.edit).abs().mean(1, keepdim=True)
    assert by_tuning[p["lm"] > 0.5].mean() > 1e-3, by_tuning.max()
    assert by_tuning[p["lm"] <= 0.5].max() < 1e-5


def test_time_budget_stops_the_finetuning(tiny_sd, prepared):
    p = prepared
    e_opt = layered.mix_embeddings(p["ea"], p["eb"])
    _, report = layered.finetune_lora(tiny_sd, p["z0"], p["lm"], e_opt, steps=50,
                                      time_budget_s=1e-9)
    assert any("time budget" in n for n in report.notes)
    counts = report.get(layered.FINETUNE)
    assert counts is None or counts.applied < 50


def test_progress_and_interruption(tiny_sd, prepared):
    """Both loops show one progress bar of their steps and stop at the host's
    interruption; the user's UNet is unchanged by an interrupted fine-tuning."""
    from xmgie.mgie_core import host

    p = prepared
    bars, checks = [], []

    class Bar:
        def __init__(self, total, desc):
            self.row = [desc, total, 0]
            bars.append(self.row)

        def update(self, n=1):
            self.row[2] += n

        def close(self):
            pass

    def interrupt():
        checks.append(1)
        if len(checks) > 8:
            raise host.Interrupted()

    weights = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    previous = host.set_hooks(progress=Bar, check_interrupt=interrupt)
    try:
        layered.optimise_embeddings(tiny_sd, p["z0"], p["lm"], p["e_a"], p["e_b"], steps=3)
        with pytest.raises(host.Interrupted):
            layered.finetune_lora(tiny_sd, p["z0"], p["lm"],
                                  layered.mix_embeddings(p["ea"], p["eb"]), steps=40)
    finally:
        host.set_hooks(**vars(previous))
    assert bars[0] == [layered.EMBEDDINGS, 3, 3]
    assert bars[1][:2] == [layered.FINETUNE, 40] and 1 <= bars[1][2] < 40
    assert all(torch.equal(weights[k], v) for k, v in tiny_sd.unet.state_dict().items())


def test_half_precision_keeps_float32_adapters_and_losses(tiny_sd, prepared):
    """A bfloat16 model (CPU-friendly half precision): the embeddings, the adapters and
    the losses stay float32, and the merged UNet is the model's dtype again."""
    p = prepared
    half = copy.deepcopy(tiny_sd)
    for mod in (half.unet, half.vae, half.text_encoder):
        mod.to(dtype=torch.bfloat16)
    half.dtype = torch.bfloat16
    ea, eb, rep = layered.optimise_embeddings(half, p["z0"], p["lm"], p["e_a"], p["e_b"],
                                              steps=2)
    assert ea.dtype == eb.dtype == torch.float32
    assert rep.get(layered.EMBEDDINGS).applied + rep.get(
        layered.EMBEDDINGS).total_skipped == 2
    tuned, rep = layered.finetune_lora(half, p["z0"], p["lm"], layered.mix_embeddings(ea, eb),
                                       steps=2, lr=1e-3)
    assert next(tuned.unet.parameters()).dtype == torch.bfloat16
    assert rep.get(layered.FINETUNE).applied == 2


# --- the template, as a user runs it ---------------------------------------------------------

UPDATES = re.compile(r"^\[(\d+)\] ([^:\n]+): (\d+) update\(s\) applied, (\d+) skipped", re.M)


def test_template_runs_under_tiny_with_every_optimisation_applied(tmp_path, tiny_root,
                                                                 clean_paths, capsys):
    """`xmgie run workflows/mmig_layered_edit.json --tiny`: the runner calls every node
    inside torch.inference_mode(), as ComfyUI does; the three optimisations report
    updates applied."""
    from xmgie import cli
    from xmgie.mgie_core import tiny

    wf = ROOT / "workflows" / "mmig_layered_edit.json"
    old = os.environ.get(tiny.ENV_TINY_DIR)
    os.environ[tiny.ENV_TINY_DIR] = str(tiny_root)
    try:
        rc = cli.main(["run", str(wf), "--tiny", "--output-dir", str(tmp_path),
                       "--set", "12.steps=3", "--set", "14.steps=3", "--set", "16.steps=4"])
    finally:
        if old is None:
            os.environ.pop(tiny.ENV_TINY_DIR, None)
        else:
            os.environ[tiny.ENV_TINY_DIR] = old
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    applied = {stage.strip(): int(n) for _, stage, n, _ in UPDATES.findall(printed.out)}
    assert applied.get(layered.EMBEDDINGS) == 3, printed.out
    assert applied.get(layered.FINETUNE) == 3, printed.out
    assert applied.get("A-STAR", 0) > 0, printed.out
    assert list(tmp_path.rglob("*.png"))


def test_layered_edit_on_sdxl(tiny_sdxl, photo):
    """On SDXL each embedding ends with its pooled row: eq. 15 joins the token rows and
    one pooled row (the two's mean); the chain runs and each stage's updates apply."""
    sd = tiny_sdxl
    img, m = photo
    lat = vae.encode_photo(sd, img)
    z0 = lat.samples
    lm = layered.latent_mask(m, tuple(z0.shape[-2:]))
    e_a = encode_prompt(sd, "a photo of a yellow carpet")
    e_b = encode_prompt(sd, "a photo of the scene in a room")
    assert e_a.shape[1] == 78                    # 77 token rows and the pooled row
    joined = layered.joined_condition(e_a, e_b, 1)
    assert joined.shape[1] == 155
    torch.testing.assert_close(joined[:, -1], (e_a[:, -1] + e_b[:, -1]) / 2)
    ea, eb, report = layered.optimise_embeddings(sd, z0, lm, e_a, e_b, steps=3, lr=1e-2)
    assert report.get(layered.EMBEDDINGS).applied == 3
    assert not torch.equal(ea[:, -1], e_a[:, -1])      # the pooled rows are optimised too
    e_opt = layered.mix_embeddings(ea, eb)
    tuned, report = layered.finetune_lora(sd, z0, lm, e_opt, steps=3, lr=1e-3)
    assert report.get(layered.FINETUNE).applied == 3
    assert tuned.text_encoder_2 is sd.text_encoder_2
    res = layered.layered_edit(tuned, z0, e_opt, source_prompt=SRC, target_prompt=TGT,
                               mask=m, steps=3,
                               controls=[astar.AStarControl(["yellow", "carpet"])],
                               fit=lat.fit)
    assert res.report.get("A-STAR").applied > 0
    dz = (res.edit - z0).abs().mean(1, keepdim=True)
    assert dz[lm > 0.5].mean() > 1e-3 and dz[lm <= 0.5].max() < 1e-5
