"""No host synchronisation inside the per-step loops of the fast path.

The counter (bench/syncs.py) runs on the CPU, where every tensor is on the host, so
it counts the operations that WOULD make the host wait for a GPU (scalar reads, copies to
the host, host-made tensors, explicit moves to the device), per stage and per step. The
fast path -- direct and negative-prompt inversion, the two-branch sampler with prompt-to-
prompt injection, CAM, PFB and MAG's inner loop -- must count zero in every step; the
seed-faithful path (null-text inversion) reads exactly once per inner iteration."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from xmgie.mgie_core import (
    astar,
    attention,
    attention_hooks,
    host,
    inversion,
    mag,
    pfb,
    sampler,
    vae,
)
from xmgie.mgie_core import identity_guidance as idg
from xmgie.mgie_core.architecture import SD1
from xmgie.mgie_core.models import identity as id_lib

# The counter is a diagnostic beside the benchmark, outside the library.
_BENCH = str(Path(__file__).resolve().parent.parent / "bench")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
import syncs  # noqa: E402

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
STEPS = 4
SYNC_KINDS = syncs.KINDS + ("placement",)


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def z0(sd, image):
    return vae.encode(sd, image).samples


def _per_step(counter: syncs.SyncCounter, stage: str) -> list[dict]:
    s = counter.stage(stage)
    return [{k: c[k] for k in SYNC_KINDS if c[k]} for c in s.steps]


def _assert_clean(counter, stage, steps=STEPS):
    per = _per_step(counter, stage)
    assert len(per) == steps, (stage, per)
    assert all(not c for c in per), (stage, per, [e for e in counter.events if e[0] == stage])


# --- the counter itself -----------------------------------------------------------------

def test_the_counter_sees_every_kind_of_wait():
    """Each pattern the loops must not contain is counted (so a zero means something)."""
    x = torch.randn(4)
    cases = {
        "scalar_read": [lambda: x[0].item(), lambda: float(x[0]), lambda: bool(x[0] > 0),
                        lambda: int(x[1]), lambda: x.tolist(), lambda: x[x > 0],
                        lambda: torch.equal(x, x), lambda: x.nonzero(),
                        lambda: bool(torch.isfinite(x).all()), lambda: f"{x[0]:.2f}"],
        "to_host": [lambda: x.cpu(), lambda: x.to("cpu")],
        "host_tensor": [lambda: x[[0, 2]], lambda: torch.tensor([1.0, 2.0]),
                        lambda: torch.arange(3)],
        "placement": [lambda: x.to(torch.device("cpu"))],
    }
    for kind, fns in cases.items():
        for fn in fns:
            with syncs.SyncCounter(trace=True) as c:
                fn()
            got = c.stage(syncs.OUTSIDE).summary()["by_kind"]
            assert got[kind] >= 1, (kind, got)
    # device-side work counts nothing
    with syncs.SyncCounter() as c:
        y = torch.where(torch.isfinite(x).all() & x.ne(0).any(), x * 2, x)
        torch.stack([y, y]).sum(0)
        torch.zeros(3, device=x.device)
    assert c.summary().get(syncs.OUTSIDE, {"total": 0})["total"] == 0


def test_steps_come_from_the_progress_bars():
    from xmgie.mgie_core import host

    x = torch.randn(2)
    with syncs.SyncCounter() as c:
        with host.progress(3, "loop") as bar:
            for i in range(3):
                if i == 1:
                    x.tolist()
                bar.update()
    assert c.stage("loop").per_step() == [0, 1, 0]


# --- the fast path: zero per step ---------------------------------------------------------

def test_fast_path_has_no_host_waits_in_any_step(sd, z0, mask):
    """Direct inversion, then the batched two-branch sampler with injection (refine),
    CAM on the edit word, PFB's feature and latent blending and MAG (two iterations in
    the first two steps): nothing in any step reads a value back, copies to the host,
    makes a host tensor or moves a tensor to the device."""
    with syncs.SyncCounter(trace=True) as c:
        inv = inversion.invert(sd, z0, SRC, method="direct", steps=STEPS,
                               image_size=(128, 128))
    _assert_clean(c, "DDIM inversion")
    assert inv.latents.device.type == sd.device.type     # the trajectory stays on the device

    ctl = mag.MAGControl(mask, ["yellow"], iterations=2)
    with syncs.SyncCounter(trace=True) as c:
        res = sampler.edit(sd, inv, TGT, mask=mask,
                           cam=sampler.CAMSettings(in_words=["yellow"]),
                           controls=[pfb.PFBControl(mask, preset="object"), ctl])
    _assert_clean(c, "editing")
    # the work did happen: MAG updated in its steps, read once at the end of the run
    assert res.report.get("MAG").applied == 2 * round(0.5 * STEPS)
    assert [h["step"] for h in ctl.history] == [0, 0, 1, 1]
    assert res.edit.device.type == sd.device.type and torch.isfinite(res.edit).all()


def test_negative_prompt_inversion_and_unbatched_sampler_are_clean(sd, z0, mask):
    with syncs.SyncCounter(trace=True) as c:
        inv = inversion.invert(sd, z0, SRC, method="negative_prompt", steps=STEPS)
        sampler.edit(sd, inv, TGT, mask=mask, cam=sampler.CAMSettings(in_words=["yellow"]),
                     controls=[pfb.PFBControl(mask)], batched=False, p2p_mode="replace")
    _assert_clean(c, "DDIM inversion")
    _assert_clean(c, "editing")
    assert inv.null_embeddings.device.type == sd.device.type


def test_astar_and_identity_guidance_loops_are_clean(sd, z0, mask, tiny_models, image):
    inv = inversion.invert(sd, z0, SRC, method="direct", steps=STEPS)
    with syncs.SyncCounter(trace=True) as c:
        res = sampler.edit(sd, inv, "a photo of a yellow carpet and a cat in a room",
                           mask=mask, controls=[astar.AStarControl(["carpet", "cat"])])
    _assert_clean(c, "editing")
    assert res.report.get("A-STAR") is not None
    encoder = id_lib.load_clip_vision(str(tiny_models("clip_vision")), device="cpu")
    emb = idg.embed_identity(encoder, image, mask)
    with syncs.SyncCounter(trace=True) as c:
        res = sampler.edit(sd, inv, TGT, mask=mask,
                           controls=[idg.IdentityGuidance(encoder, emb, start=0.0, end=0.5)])
    assert res.report.get("identity guidance").applied == 2
    _assert_clean(c, "editing")       # the encoder's preprocessing included


def test_instruction_sampler_is_clean(tiny_ip2p, image, mask):
    ip = tiny_ip2p
    lat = vae.encode(ip, image)
    cond = sampler.encode_instruction(ip, "make the carpet yellow")
    for scheduler in ("euler_ancestral", "ddim"):
        with syncs.SyncCounter(trace=True) as c:
            sampler.edit_instruct(ip, lat.samples / ip.vae.config.scaling_factor, cond,
                                  steps=STEPS, mask=mask, source_latent=lat.samples,
                                  cam=sampler.CAMSettings(in_words=["yellow"]),
                                  controls=[pfb.PFBControl(mask)], scheduler=scheduler)
        _assert_clean(c, "instruction editing")


def test_device_caches_name_a_device_one_way():
    """The run's device caches are filled before the loop with the model's device
    (``sd.device``, "cuda") and read inside it with a tensor's device ("cuda:0"). Keyed by
    ``str(device)``, every lookup of step 0 missed: the H200 run of this file counted 4
    host-to-device copies in the sampler's first step (one per mask size), 3 in the
    instruction sampler's, none on the CPU. The CPU has the same pair of names."""
    assert host.device_key("cuda") == host.device_key("cuda:0") == host.device_key(
        torch.device("cuda", 0))
    assert host.device_key(torch.device("cpu", 0)) == host.device_key("cpu") == "cpu"
    assert host.device_key("cuda:1") != host.device_key("cuda:0")

    m = torch.zeros(1, 64, 64)
    m[:, 10:40, 12:50] = 1
    pyramid = attention.MaskPyramid(m)
    sizes = SD1.level_sizes((16, 16))
    pyramid.prepare(sizes, torch.device("cpu", 0))          # before the loop: sd.device
    before = {hw: pyramid.at(hw, torch.device("cpu", 0)) for hw in sizes}
    tensor_device = torch.zeros(1).device                   # in the loop: tensor.device
    with syncs.SyncCounter(trace=True) as c:
        during = {hw: pyramid.at(hw, tensor_device) for hw in sizes}
    assert all(during[hw] is before[hw] for hw in sizes)
    assert len(pyramid._cache) == len(sizes)
    assert not c.events, c.events

    hook = attention_hooks.InjectionHook(torch.tensor([0, 1, 2, -1]), cross_steps=2, self_steps=1)
    hook.prepare(torch.device("cpu", 0), (16, 16))
    got = hook._device_mapper(torch.device("cpu"), torch.float32)
    assert got is hook._device_mapper(torch.device("cpu", 0), torch.float32)
    assert len(hook._on) == 1


# --- the seed-faithful path: its stated count -------------------------------------------

def test_null_text_reads_once_per_inner_iteration(sd, z0):
    """Null-text's early stop is a data-dependent branch: exactly one read (the loss and
    the gradient's finiteness, together) per inner iteration, nothing else of ours per
    step. On the CPU the counter also sees torch.optim.Adam's step counter (a host tensor
    it creates and reads; on a GPU those are host reads, not waits)."""
    inner = 3
    # told the model's device: on a GPU, Adam's step counter is a host tensor and its
    # reads are host reads (``host_read``), not waits
    with syncs.SyncCounter(device=sd.device, trace=True) as c:
        inv = inversion.invert(sd, z0, SRC, method="null_text", steps=STEPS, inner_steps=inner)
    ours = [0] * STEPS
    for stage, step, _kind, what in c.events:
        if stage == "null-text inversion" and what == "tolist":
            ours[step] += 1
    counts = inv.updates.get(inversion.NULL_TEXT)
    assert sum(ours) == counts.applied + counts.total_skipped
    assert all(1 <= n <= inner for n in ours), ours
    # nothing else per step but Adam's bookkeeping: one step-counter read per update
    # and one host scalar per step (its state)
    for step in range(STEPS):
        others = [e for e in c.events if e[0] == "null-text inversion" and e[1] == step
                  and e[3] != "tolist" and e[2] != "host_read"]
        assert len(others) <= 2 * ours[step], others
    _assert_clean(c, "DDIM inversion")
    assert inv.null_embeddings.device.type == sd.device.type


def test_deferred_verdicts_still_warn_and_count(sd, z0, mask, monkeypatch, caplog):
    """A non-finite gradient is skipped on the device; the warning and the count come
    when the run ends, with the text they always had."""
    inv = inversion.invert(sd, z0, SRC, method="direct", steps=STEPS)
    real = mag.token_ratio_loss
    monkeypatch.setattr(mag, "token_ratio_loss", lambda *a: real(*a) * float("nan"))
    with caplog.at_level(logging.WARNING):
        res = sampler.edit(sd, inv, TGT, mask=mask, controls=[mag.MAGControl(mask, ["yellow"],
                                                                             iterations=2)])
    counts = res.report.get("MAG")
    assert counts.applied == 0 and counts.skipped == {"non-finite gradient": 4}
    assert caplog.text.count("MAG: non-finite gradient at step") == 4


def test_device_caches_made_in_inference_mode_serve_the_backward(sd, z0, mask):
    """ComfyUI runs nodes inside inference mode: the run's device caches (masks, token
    positions, the injection's mapper, CAM's bias and keep maps) are made as normal
    tensors, so MAG's and A-STAR's backward passes may save them."""
    with torch.inference_mode():
        inv = inversion.invert(sd, z0, SRC, method="direct", steps=3)
        res = sampler.edit(sd, inv, TGT, mask=mask,
                           cam=sampler.CAMSettings(in_words=["yellow"], mode="probs"),
                           controls=[pfb.PFBControl(mask), astar.AStarControl(["yellow"]),
                                     mag.MAGControl(mask, ["yellow"], iterations=1)])
    assert res.report.get("MAG").applied == 2
