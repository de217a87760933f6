"""The pack run the way ComfyUI runs it, through the headless runner.

ComfyUI executes every node inside ``torch.inference_mode()``, so the loader nodes build
their models there too. Each graph below is executed by ``runner.engine.execute`` with the
pack's real nodes and tiny models loaded by the pack's loader nodes, and the call is
additionally wrapped in ``torch.inference_mode()`` by the test, so the graphs meet the
conditions of a ComfyUI server even with a runner that did not enter inference mode itself.

* every gradient-based stage works there: null-text inversion reconstructs closer than
  DDIM; MAG, A-STAR and identity guidance each change the edit against the same run
  without them, and their update counts (the sampler node's text output) are nonzero;
* a control whose gradient is missing raises instead of applying a zero update;
* SaveImage writes ComfyUI's pixels (truncation, not rounding);
* the pack's models are registered, loaded for the nodes that use them, and released by
  the free-memory path (standalone registry; the ComfyUI adapter is checked against a
  real ComfyUI in ``test_comfy_adapter.py``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from xmgie import cli
from xmgie.mgie_core import astar, grad_mode, guidance, mag, memory, paths
from xmgie.mgie_core.errors import GradientError
from xmgie.runner import core_nodes, engine

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
STEPS = 4
SIZE = 128


@pytest.fixture(scope="module")
def setup(tiny_root, tiny_models, tmp_path_factory):
    """Tiny models in tiny mode (so dropdowns list them), an input image and mask."""
    for family in ("sd_diffusers", "clip_vision"):
        tiny_models(family)
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        folder / "photo.png")
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[32:96, 40:104] = 255
    Image.fromarray(m).save(folder / "mask.png")
    paths.configure(reset=True)
    paths.configure(tiny_root=tiny_root)
    registry = cli.build_registry()
    ctx = core_nodes.RunContext(input_dirs=[folder], output_dir=tmp_path_factory.mktemp("out"))
    yield registry, ctx
    paths.configure(reset=True)


def graph(method="direct", controls=(), target=TGT, replace=(0.8, 0.5), inner_steps=10):
    """Load image and mask, load SD (a loader node), invert, optional controls, the
    two-branch sampler, decode, save."""
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "3": {"class_type": "XMGIELoadDiffusers",
              "inputs": {"model": paths.list_models(paths.SD_DIFFUSERS)[0], "dtype": "fp32"}},
        "4": {"class_type": "XMGIEInvert",
              "inputs": {"sd_model": ["3", 0], "image": ["1", 0], "source_prompt": SRC,
                         "method": method, "steps": STEPS, "guidance": 7.5,
                         "inner_steps": inner_steps}},
        "20": {"class_type": "XMGIECAMSampler",
               "inputs": {"sd_model": ["3", 0], "inversion": ["4", 0], "target_prompt": target,
                          "cam_in_words": "", "cam_out_words": "", "cam_mode": "logits",
                          "cross_replace": replace[0], "self_replace": replace[1],
                          "batched": True, "mask": ["2", 0]}},
        "21": {"class_type": "XMGIEVAEDecode", "inputs": {"sd_model": ["3", 0],
                                                          "latent": ["20", 0]}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0],
                                                     "filename_prefix": "edit"}},
    }
    previous = None
    for i, (class_type, inputs) in enumerate(controls):
        node_id = str(10 + i)
        g[node_id] = {"class_type": class_type,
                      "inputs": {**inputs, **({"controls": [previous, 0]} if previous else {})}}
        previous = node_id
    if previous:
        g["20"]["inputs"]["controls"] = [previous, 0]
    return g


def run(setup, prompt):
    """Execute like ComfyUI: every node (the loaders included) inside inference mode."""
    registry, ctx = setup
    with core_nodes.using_context(ctx), torch.inference_mode():
        return engine.execute(prompt, registry)


def applied(result, node_id, stage):
    """Updates ``stage`` applied, read from the node's text output."""
    for line in result.ui.get(node_id, {}).get("text", []):
        found = re.match(rf"{re.escape(stage)}: (\d+) update\(s\) applied", line)
        if found:
            return int(found.group(1))
    return None


MAG = ("XMGIEMAGControl", {"mask": ["2", 0], "words": "yellow", "negative_words": "",
                           "opt_fraction": 0.5, "iterations": 3, "scale": 2.5,
                           "spatial_ratio": False, "negative_weight": 5.5,
                           "blend_fraction": 0.0})
ASTAR = ("XMGIEAStarControl", {"words": "yellow, room", "steps_fraction": 0.75,
                               "step_size": 2.5, "threshold": 0.5, "mask": ["2", 0]})


def with_identity(g):
    g["30"] = {"class_type": "XMGIELoadIdentityEncoder",
               "inputs": {"kind": "clip_vision",
                          "model_name": paths.list_models(paths.CLIP_VISION)[0]}}
    g["31"] = {"class_type": "XMGIEIdentityEmbed",
               "inputs": {"identity_encoder": ["30", 0], "image": ["1", 0], "mask": ["2", 0],
                          "crop_margin": 0.1}}
    g["32"] = {"class_type": "XMGIEIdentityGuidance",
               "inputs": {"identity_encoder": ["30", 0], "embedding": ["31", 0],
                          "start": 0.0, "end": 1.0, "weight": 0.3, "memory": "checkpoint",
                          "mask": ["2", 0]}}
    g["20"]["inputs"]["controls"] = ["32", 0]
    return g


# --- gradient-based stages under inference mode ----------------------------------------

def test_null_text_reconstructs_closer_than_ddim_under_inference_mode(setup):
    def error(method):
        res = run(setup, graph(method, target=SRC, replace=(0.0, 0.0)))
        z0 = res.outputs["4"][1]["samples"]
        rec = res.outputs["20"][1]["samples"]
        return (rec - z0).abs().mean().item(), res

    e_ddim, _ = error("ddim")
    e_null, res = error("null_text")
    assert e_null < 0.9 * e_ddim, (e_null, e_ddim)
    n = applied(res, "4", "null-text inversion")
    assert n is not None and n > 0, res.ui
    assert res.outputs["4"][0].null_embeddings.shape[0] == STEPS


@pytest.fixture(scope="module")
def edits(setup):
    """The same edit without controls, and with each gradient-based control alone."""
    out = {"none": run(setup, graph())}
    out["MAG"] = run(setup, graph(controls=[MAG]))
    out["A-STAR"] = run(setup, graph(controls=[ASTAR]))
    out["identity guidance"] = run(setup, with_identity(graph()))
    return out


@pytest.mark.parametrize("stage", ["MAG", "A-STAR", "identity guidance"])
def test_each_control_changes_the_edit_with_applied_updates(edits, stage):
    base = edits["none"].outputs["20"][0]["samples"]
    res = edits[stage]
    edit = res.outputs["20"][0]["samples"]
    assert torch.isfinite(edit).all()
    change = (edit - base).abs().mean().item()
    assert change > 1e-3, (stage, change)
    n = applied(res, "20", stage)
    assert n is not None and n > 0, res.ui.get("20")
    # the run without controls reports nothing, the reconstruction is the same in both
    assert "20" not in edits["none"].ui
    assert torch.allclose(res.outputs["20"][1]["samples"],
                          edits["none"].outputs["20"][1]["samples"], atol=1e-5)


def test_counts_are_per_run_and_structured(edits):
    ui = edits["A-STAR"].ui["20"]
    (counts,) = [c for c in ui["updates"] if c["stage"] == "A-STAR"]
    # 3 of 4 steps optimised, one update each; "yellow, room": "room" is also in the
    # source prompt, "yellow" is not, so no step has a constant loss.
    assert counts["applied"] + sum(counts["skipped"].values()) == 3
    assert counts["applied"] > 0


def test_single_concept_first_step_is_a_counted_skip(setup):
    one = ("XMGIEAStarControl", {**ASTAR[1], "words": "yellow"})
    res = run(setup, graph(controls=[one]))
    (counts,) = res.ui["20"]["updates"]
    assert counts["stage"] == "A-STAR"
    assert counts["skipped"] == {
        "constant loss: one concept and no previous region (first step)": 1}
    assert counts["applied"] == 2
    assert any("1 x constant loss" in line for line in res.ui["20"]["text"])


# --- a missing gradient is an error -------------------------------------------------------

def test_astar_without_a_gradient_raises_naming_the_control(setup, monkeypatch):
    """The maps reach the loss detached (as with inference tensors or no_grad): A-STAR
    used to apply a zero update and report it applied; now the run stops and says why."""
    real = astar.concept_maps
    monkeypatch.setattr(astar, "concept_maps", lambda *a: real(*a).detach())
    with pytest.raises(engine.WorkflowError) as info:
        run(setup, graph(controls=[ASTAR]))
    err = info.value
    assert err.class_type == "XMGIECAMSampler"
    assert isinstance(err.__cause__, GradientError)
    assert "A-STAR: no gradient at step 0" in str(err)
    assert "the loss carries no autograd graph" in str(err)


def test_mag_without_a_gradient_raises_naming_the_control(setup, monkeypatch):
    real = mag.MAGControl.loss
    monkeypatch.setattr(mag.MAGControl, "loss",
                        lambda self, maps, hw: tuple(
                            x.detach() if torch.is_tensor(x) else x
                            for x in real(self, maps, hw)))
    with pytest.raises(engine.WorkflowError, match="MAG: no gradient at step 0"):
        run(setup, graph(controls=[MAG]))


def test_gradient_reasons_name_the_cause():
    z = torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        loss = (z * 2).sum()
    with pytest.raises(GradientError, match=r"identity guidance: no gradient at step 4: "
                                            r"the loss carries no autograd graph"):
        guidance.gradient(loss, z, "identity guidance", 4)
    with torch.no_grad(), pytest.raises(GradientError, match="gradients are disabled"):
        guidance.gradient(loss, z, "MAG", 0)
    unrelated = torch.ones((), requires_grad=True) * 2
    with pytest.raises(GradientError, match="does not depend on the optimised tensor"):
        guidance.gradient(unrelated, z, "A-STAR", 1)
    with torch.inference_mode():
        loss = torch.ones(()) * 2
        with pytest.raises(GradientError, match="inside torch.inference_mode"):
            guidance.gradient(loss, z, "MAG", 0)


# --- autograd helpers ------------------------------------------------------------------------

def test_autograd_block_clones_inference_inputs_and_loaders_build_normal_weights(tiny_root):
    with torch.inference_mode():
        with grad_mode.loading():
            lin = torch.nn.Linear(3, 2)
        made_inside = torch.nn.Linear(3, 2)
        x = torch.randn(4, 3)
        with grad_mode.autograd():
            xi = grad_mode.autograd_input(x).requires_grad_(True)
            (lin(xi) ** 2).sum().backward()
            assert xi.grad is not None and not lin.weight.is_inference()
            with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
                made_inside(grad_mode.autograd_input(x).requires_grad_(True)).sum().backward()
        assert grad_mode.normal_weights(made_inside) == 2
        with grad_mode.autograd():
            xi = grad_mode.autograd_input(x).requires_grad_(True)
            made_inside(xi).sum().backward()
        assert xi.grad is not None
    normal = torch.zeros(2)
    assert grad_mode.autograd_input(normal) is normal


# --- SaveImage pixels ----------------------------------------------------------------------

def test_save_image_truncates_like_comfyui(tmp_path):
    values = torch.tensor([0.0, 0.5, 0.999, 1 / 255, 254.7 / 255, 1.0, 1.2, -0.1])
    image = values.view(1, 1, -1, 1).expand(1, 1, -1, 3).contiguous()
    (path,) = core_nodes.save_images(image, tmp_path, "t")
    got = np.asarray(Image.open(path))[0, :, 0]
    comfy = np.clip(255. * image[0].cpu().numpy(), 0, 255).astype(np.uint8)[0, :, 0]
    assert got.tolist() == comfy.tolist() == [0, 127, 254, 1, 254, 255, 255, 0]


# --- memory: the registry of the pack's models ------------------------------------------------

class Budget:
    """Free memory of a device as a budget minus the registry's loaded models: what a
    GPU's driver would report, for a CPU-only test of the free-memory policy."""

    def __init__(self, total):
        self.total = total

    def __call__(self, dev):
        return self.total - sum(e.nbytes for e in memory.registry().entries()
                                if e.loaded and e.load_device == dev)


@pytest.fixture
def reg(monkeypatch):
    """A registry of its own for the test (the session's other models stay out of it)."""
    fresh = memory.ModelRegistry()
    monkeypatch.setattr(memory, "_registry", fresh)
    return fresh


def test_free_memory_path_releases_the_packs_models(setup, reg, monkeypatch):
    registry, ctx = setup
    # Load SD and the identity encoder through their loader nodes, inside inference mode.
    g = {"3": graph()["3"], "30": with_identity(graph())["30"]}
    with torch.inference_mode():
        (sd,) = registry["XMGIELoadDiffusers"]().load(**g["3"]["inputs"])
        (enc,) = registry["XMGIELoadIdentityEncoder"]().load(**g["30"]["inputs"])
    sd_entries, enc_entries = reg.entries_of(sd), reg.entries_of(enc)
    assert [e.module for e in sd_entries] == [sd.unet, sd.vae, sd.text_encoder]
    assert all(not p.is_inference() for e in sd_entries + enc_entries
               for p in e.module.parameters())
    assert all(e.is_loaded() for e in sd_entries + enc_entries)
    # A device with room for the encoder, or SD, but not both.
    sd_bytes = sum(e.nbytes for e in sd_entries)
    enc_bytes = sum(e.nbytes for e in enc_entries)
    monkeypatch.setattr(reg, "free_bytes", Budget(max(sd_bytes, enc_bytes) + 1000))
    monkeypatch.setattr(reg, "reserve", 0)
    dev = torch.device("cpu")
    with memory.use([sd]):
        released = reg.free(enc_bytes, dev)
        assert released == enc_entries                      # SD is in use: kept
    assert all(e.is_loaded() for e in sd_entries)
    released = reg.free(enc_bytes, dev)                      # SD idle now: released
    assert set(map(id, released)) <= set(map(id, sd_entries)) and released
    assert not all(e.is_loaded() for e in sd_entries)
    # a node using SD puts it back, with normal weights
    with torch.inference_mode(), memory.use(sd) as used:
        assert used == sd_entries and all(e.is_loaded() for e in sd_entries)
        assert not any(p.is_inference() for p in sd.unet.parameters())


def test_offload_after_use_and_the_node_wrapper(setup, reg):
    registry, ctx = setup
    previous = memory.set_offload_after_use(True)
    try:
        with torch.inference_mode():
            (sd,) = registry["XMGIELoadDiffusers"]().load(
                **graph()["3"]["inputs"])
        entries = reg.entries_of(sd)
        assert entries and not any(e.is_loaded() for e in entries)   # placed on the CPU
        seen = []

        class Probe:
            RETURN_TYPES = ("INT",)
            FUNCTION = "run"

            def run(self, sd_model):
                seen.append([e.is_loaded() for e in reg.entries_of(sd_model)])
                return (1,)

        from xmgie.nodes._common import uses_models

        uses_models(Probe)
        Probe().run(sd_model=sd)
        assert seen == [[True, True, True]]                          # loaded while it ran
        assert not any(e.is_loaded() for e in entries)               # offloaded after
    finally:
        memory.set_offload_after_use(previous)


def test_registry_lets_go_of_released_models(setup, reg):
    registry, _ = setup
    before = len(reg.entries())
    with torch.inference_mode():
        (sd,) = registry["XMGIELoadDiffusers"]().load(**graph()["3"]["inputs"])
    assert len(reg.entries()) == before + 3
    del sd
    import gc

    gc.collect()
    assert len(reg.entries()) == before


def test_update_counts_are_a_string_output_a_text_display_can_show(setup):
    """The counts are also the samplers' and Invert's last output (STRING), so a core text
    display (Preview Any) shows them inside ComfyUI, where ui text needs an extension."""
    from xmgie.nodes import editing

    for cls in (editing.Invert, editing.CAMSampler, editing.InstructSampler):
        assert cls.RETURN_TYPES[-1] == "STRING" and cls.RETURN_NAMES[-1] == "updates"
    res = run(setup, graph("ddim", controls=[ASTAR]))
    text = res.outputs["20"][-1]
    assert isinstance(text, str) and text.startswith("A-STAR:"), text
    assert text.splitlines() == res.ui["20"]["text"]
    assert res.outputs["4"][-1] == "no optimising stage ran"        # DDIM: nothing to count
