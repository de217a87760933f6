"""Captured CUDA graphs (mgie_core/graphs.py): which path runs, and that it keeps the edit.

On the CPU: the selection (captured on a CUDA device, eager with its reason elsewhere),
the hooks' regimes, the call sites' fallback (an edit with compile_unet="graphs" equals
the eager edit exactly where nothing can be captured), and a capture that torch itself
refuses (attempted on a machine without a usable CUDA device) falling back with a
warning. With CUDA: graphed against eager edits within the pack's fp16 tolerances
(tests/test_fast_paths.py), with the replays counted.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from xmgie.mgie_core import attention, attention_hooks, graphs, inversion, mag, pfb, sampler, vae
from xmgie.mgie_core.attention import COND, AttnContext, BatchLayout, Branch
from xmgie.mgie_core.models import compile as compiling

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
STEPS = 4
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fast_edit(sd, z0, mask, steps=STEPS):
    inv = inversion.invert(sd, z0, SRC, method="direct", steps=steps)
    res = sampler.edit(sd, inv, TGT, mask=mask, cam=sampler.CAMSettings(in_words=["yellow"]),
                       controls=[pfb.PFBControl(mask),
                                 mag.MAGControl(mask, ["yellow"], iterations=2)])
    return inv, res


@pytest.fixture(scope="module")
def z0(tiny_sd, image):
    return vae.encode(tiny_sd, image).samples


@pytest.fixture
def fresh_log(monkeypatch):
    """Every fallback reason logged again (they are logged once per process), and no
    earlier failed capture (it turns captures off for the process)."""
    monkeypatch.setattr(graphs, "_said", set())
    monkeypatch.setattr(graphs, "_broken", "")


# --- selection ----------------------------------------------------------------------------

def _record_graph_caches(monkeypatch) -> list:
    """The GraphCache instances the run creates, in creation order (their stats say
    what each call site captured, replayed or ran eagerly)."""
    seen = []
    real = graphs.GraphCache.__init__

    def keep(self, *a, **k):
        real(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(graphs.GraphCache, "__init__", keep)
    return seen


def test_selection_captures_on_cuda_and_says_why_not_elsewhere():
    on_cuda = graphs.select("graphs", "cuda", cuda=True)
    assert on_cuda.captured and "CUDA" in on_cuda.reason
    assert graphs.select("graphs", "cuda:0", cuda=True).captured
    for device, words in (("cpu", "runs on cpu"), ("mps", "runs on mps"),
                          ("meta", "runs on meta")):
        d = graphs.select("graphs", device, cuda=True)
        assert not d.captured and words in d.reason and "CUDA GPU" in d.reason
    no_cuda = graphs.select("graphs", "cuda", cuda=False)
    assert not no_cuda.captured and "no usable CUDA" in no_cuda.reason
    off = graphs.select("default", "cuda", cuda=True)
    assert not off.captured and "'default'" in off.reason
    # what the machine running the tests says for itself
    assert graphs.select("graphs", "cuda").captured == torch.cuda.is_available()


def test_graphs_mode_compiles_nothing_and_marks_the_unet(tiny_sd):
    model = copy.deepcopy(tiny_sd)
    assert compiling.compile_unet(model.unet, "graphs") == 0
    assert compiling.compiled_mode(model.unet) == "graphs"
    assert not any("forward" in m.__dict__ for m in model.unet.modules())
    cache = graphs.for_run(model)
    assert not cache.active and "cpu" in cache.decision.reason
    compiling.compile_unet(model.unet, "off")
    assert "'off'" in graphs.for_run(model).decision.reason


def test_regime_follows_the_hooks_step_windows_and_refuses_unknown_hooks():
    inj = attention_hooks.InjectionHook(torch.arange(77), cross_steps=3, self_steps=2)
    cam = attention_hooks.CAMHook(torch.ones(1, 16, 16), [2])
    layout = BatchLayout(((Branch.REC, COND), (Branch.EDIT, COND)))

    def key(step, hooks=(inj, cam)):
        return graphs.regime(hooks, [], AttnContext(step, 4, layout, (16, 16)), 0)

    assert key(0)[0] == key(1)[0]                    # both windows open: one graph
    assert key(1)[0] != key(2)[0] != key(3)[0]       # self window, then cross, close
    assert key(3)[0] == key(4)[0]

    class HostState(attention.AttnHook):             # e.g. a counter kept in Python
        def observe(self, layer, ctx, probs):
            self.calls = getattr(self, "calls", 0) + 1

    k, why = key(0, (inj, HostState()))
    assert k is None and "HostState" in why and "eagerly" in why
    k, why = graphs.regime([], [], AttnContext(0, 4, layout, (16, 16)), patches=2)
    assert k is None and "module patches" in why


def test_regime_knows_controls_by_their_exact_class(mask):
    from xmgie.mgie_core import graph_calls  # noqa: F401  (registers MAG and PFB)

    ctx = AttnContext(0, 4, BatchLayout(((Branch.EDIT, COND),)), (16, 16))
    known = mag.MAGControl(mask, ["yellow"])
    assert graphs.regime([], [known], ctx, 0)[0] is not None

    class Probe(mag.MAGControl):              # a subclass may keep state of its own
        def loss(self, maps, hw):
            self.seen = maps
            return super().loss(maps, hw)

    k, why = graphs.regime([], [known, Probe(mask, ["yellow"])], ctx, 0)
    assert k is None and "Probe" in why
    # patches with no known owner among the controls (MAG patches nothing)
    k, why = graphs.regime([], [known], ctx, patches=1)
    assert k is None and "unknown owner" in why


def test_state_tensors_are_found_in_the_hooks_by_path():
    inj = attention_hooks.InjectionHook(torch.arange(77), 3, 2)
    inj.prepare("cpu", (16, 16))
    cam = attention_hooks.CAMHook(torch.ones(1, 16, 16), [2])
    cam.prepare("cpu", (16, 16))
    found = graphs.state_tensors([[inj, cam]])
    assert any("InjectionHook" in map(str, p) for p in found)
    assert any("MaskPyramid" in map(str, p) for p in found)       # CAM's masks
    assert found == graphs.state_tensors([[inj, cam]])            # stable paths
    assert not graphs.state_tensors([[inj, cam]], torch.device("meta"))
    # a model's device named without an index ("cuda") holds the tensors of "cuda:0"
    assert graphs.state_tensors([[inj, cam]], torch.device("cpu:0")) == found


def test_a_replay_reads_this_steps_recording_through_the_captured_tensors():
    """MAG's graph is captured once and replayed at every optimised step, each with a
    new reconstruction recording (new tensors in a new recorder). Before a replay the
    current recording is copied into the tensors the graph was captured reading; the
    shared ones (the injection's mapper) are left alone; a recording of another form
    asks for a new capture."""
    from xmgie.mgie_core import guidance

    inj = attention_hooks.InjectionHook(torch.arange(77), 3, 2)
    inj.prepare("cpu", (16, 16))

    def recording(value):
        rec = guidance.SourceRecorder()
        rec.probs["attn2"] = torch.full((2, 16, 77), value)
        rec.qk["attn1"] = (torch.full((2, 64, 4), value), torch.full((2, 64, 4), -value))
        return rec

    step0 = recording(0.0)
    captured = graphs.state_tensors([[inj], step0])
    read_by_graph = dict(captured)              # what the graph's kernels point at
    mapper = [t for p, t in captured.items() if "InjectionHook" in map(str, p)]
    step1 = recording(1.0)
    assert graphs.refresh_state(captured, graphs.state_tensors([[inj], step1]))
    assert all(captured[p] is read_by_graph[p] for p in captured)    # same tensors
    assert torch.equal(step0.probs["attn2"], step1.probs["attn2"])   # ... step 1's data
    assert torch.equal(step0.qk["attn1"][1], torch.full((2, 64, 4), -1.0))
    assert all(t is u for t, u in zip(mapper, [t for p, t in graphs.state_tensors(
        [[inj]]).items()]))
    other = recording(2.0)
    other.probs["attn2"] = torch.zeros(2, 4, 77)                     # another size
    assert not graphs.refresh_state(captured, graphs.state_tensors([[inj], other]))
    del other.probs["attn2"]
    assert not graphs.refresh_state(captured, graphs.state_tensors([[inj], other]))
    assert torch.equal(step0.probs["attn2"], torch.ones(2, 16, 77))  # left as it was


# --- fallback: the edit is the eager one --------------------------------------------------

def _eager_copy(tiny_sd, z0, mask):
    """A copy of the model after one edit: the sampler has put the pack's attention
    processors on it, which the inversion then runs too (diffusers' stock processor
    rounds differently in the last bit), so eager and graphed edits run the same code."""
    model = copy.deepcopy(tiny_sd)
    fast_edit(model, z0, mask, steps=2)
    return model


def test_graphs_on_the_cpu_run_eagerly_and_equal_the_eager_edit(tiny_sd, z0, mask, caplog,
                                                                fresh_log):
    model = _eager_copy(tiny_sd, z0, mask)
    eager_inv, eager = fast_edit(model, z0, mask)
    compiling.compile_unet(model.unet, "graphs")
    with caplog.at_level(logging.INFO, logger=graphs.__name__):
        inv, res = fast_edit(model, z0, mask)
    assert "CUDA graphs off: the model runs on cpu" in caplog.text
    assert torch.equal(inv.latents, eager_inv.latents)
    assert torch.equal(res.edit, eager.edit)
    assert res.report.get("MAG").applied == eager.report.get("MAG").applied


def test_a_capture_torch_refuses_falls_back_with_a_warning(tiny_sd, z0, mask, caplog,
                                                          monkeypatch, fresh_log):
    """Captures attempted where torch has no usable CUDA device (this machine, or a
    GPU machine's CPU model): torch raises when the capture starts; every call site
    warns and runs eagerly, and the edit is the eager one, exactly."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine where torch refuses CUDA graphs")
    model = _eager_copy(tiny_sd, z0, mask)
    eager_inv, eager = fast_edit(model, z0, mask)
    compiling.compile_unet(model.unet, "graphs")
    monkeypatch.setattr(graphs, "ATTEMPT_ANYWHERE", True)
    seen = _record_graph_caches(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=graphs.__name__):
        inv, res = fast_edit(model, z0, mask)
    warnings = [r for r in caplog.records if "the capture failed" in r.getMessage()]
    # the first capture (the inversion's) fails; nothing is captured after it
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage().startswith("CUDA graphs: inversion: the capture failed")
    assert "eagerly from now on" in warnings[0].getMessage()
    assert "capture failed earlier" in graphs.select("graphs", "cuda", cuda=True).reason
    assert torch.equal(inv.latents, eager_inv.latents)
    assert torch.equal(res.edit, eager.edit)
    stats = sum((c.stats for c in seen), start=type(seen[0].stats)())
    # the failed call ran eagerly; every later call (the inversion's other steps, the
    # sampler's run) is plain eager code, its cache off with the reason
    assert stats == {"inversion.eager": 1}, stats
    assert "capture failed" in seen[0].reasons["inversion"]
    assert len(seen) == 2 and not seen[1].active
    assert "a capture failed earlier in this process, at inversion" in seen[1].decision.reason


def test_the_captured_functions_run_eagerly_equal_the_eager_edit(tiny_sd, z0, mask,
                                                                 monkeypatch, fresh_log):
    """What every call site hands to a capture, run eagerly (every key refused: no site
    may capture any shape), against the plain eager code: the fast edit (the DDIM
    trajectory, the sampler's batched call through the graphs' timestep input, MAG's
    truncated_gradient with the timestep from a buffer) and null-text (its loss with the
    DDIM step's numbers as tensor inputs and ``autograd.grad`` instead of
    ``backward``) give the same latents, embeddings and update counts, exactly."""
    model = _eager_copy(tiny_sd, z0, mask)
    eager_inv, eager = fast_edit(model, z0, mask)
    eager_nt = inversion.invert(model, z0, SRC, method="null_text", steps=3, inner_steps=2)
    compiling.compile_unet(model.unet, "graphs")
    monkeypatch.setattr(graphs, "ATTEMPT_ANYWHERE", True)
    monkeypatch.setattr(graphs, "MAX_KEYS_PER_SITE", 0)
    before = dict(graphs.TOTALS)
    inv, res = fast_edit(model, z0, mask)
    nt = inversion.invert(model, z0, SRC, method="null_text", steps=3, inner_steps=2)
    used = {k: v - before.get(k, 0) for k, v in graphs.TOTALS.items() if v - before.get(k, 0)}
    applied = eager_nt.updates.get("null-text inversion").applied
    assert used == {"inversion.eager": STEPS + 3, "sampler.eager": STEPS,
                    "MAG.eager": 2 * (STEPS // 2), "null-text cond.eager": 3,
                    "null-text guided.eager": 3, "null-text.eager": applied}, used
    assert torch.equal(inv.latents, eager_inv.latents)
    assert torch.equal(res.edit, eager.edit)
    assert res.report.get("MAG").applied == eager.report.get("MAG").applied
    assert torch.equal(nt.null_embeddings, eager_nt.null_embeddings)
    assert torch.equal(nt.latents, eager_nt.latents)
    assert nt.updates.get("null-text inversion").applied == applied > 0


def test_a_site_whose_shapes_keep_changing_stops_capturing(fresh_log):
    """Each new shape at a call site is a new graph; past MAX_KEYS_PER_SITE the site's
    new shapes run eagerly, with the reason (the keys already captured keep replaying)."""
    cache = graphs.GraphCache(graphs.select("graphs", "cuda", cuda=True))
    assert cache.active
    keys = [("site", ("k",), (("x", (n,), torch.float32, False),))
            for n in range(graphs.MAX_KEYS_PER_SITE + 2)]
    verdicts = [cache.admit("site", k) for k in keys]
    assert verdicts[:graphs.MAX_KEYS_PER_SITE] == [""] * graphs.MAX_KEYS_PER_SITE
    assert all("shapes that change" in v for v in verdicts[graphs.MAX_KEYS_PER_SITE:])
    assert cache.admit("other site", keys[0]) == ""          # counted per site
    assert cache.admit("site", keys[0]) == ""                # a key seen before is fine
    # a refused key runs eagerly through call(), with its reason
    refused = keys[-1]
    out = cache.call("site", refused[1], lambda x: x * 2,
                     {"x": torch.ones(graphs.MAX_KEYS_PER_SITE + 1)})
    assert torch.equal(out, torch.full((graphs.MAX_KEYS_PER_SITE + 1,), 2.0))
    assert cache.stats["site.eager"] == 1 and "shapes" in cache.reasons["site"]


# --- on a GPU: graphed against eager ----------------------------------------------------

def _cuda_model(tiny_sd):
    model = copy.deepcopy(tiny_sd)
    for m in (model.unet, model.vae, model.text_encoder):
        m.to("cuda", torch.float16)
    model.device, model.dtype = torch.device("cuda"), torch.float16
    return model


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@CUDA
def test_graphed_edit_matches_eager_on_cuda(tiny_sd, z0, mask, monkeypatch):
    """fp16 on the GPU, the same model eager and graphed: within the fp16 tolerances of
    test_fp16_edit_matches_fp32_with_float32_optimisation (trajectory 1%, edit 6%,
    image 0.01), and every call site replayed its graphs."""
    model = _cuda_model(tiny_sd)
    z, m = z0.to("cuda"), mask          # masks come from the host, as the nodes pass them
    eager_inv, eager = fast_edit(model, z, m)
    compiling.compile_unet(model.unet, "graphs")
    seen = _record_graph_caches(monkeypatch)
    inv, res = fast_edit(model, z, m)
    stats = sum((c.stats for c in seen), start=type(seen[0].stats)())
    assert stats["inversion.replay"] >= STEPS - 1, stats
    assert stats["sampler.replay"] >= 1 and stats["MAG.replay"] >= 1, stats
    assert not any(k.endswith(".eager") for k in stats), (stats, [c.reasons for c in seen])
    assert rel(inv.latents, eager_inv.latents) <= 0.01
    assert rel(res.edit, eager.edit) <= 0.06
    assert res.report.get("MAG").applied == eager.report.get("MAG").applied
    img, ref = vae.decode(model, res.edit), vae.decode(model, eager.edit)
    assert (img - ref).abs().mean() <= 0.01
    compiling.compile_unet(model.unet, "off")


@CUDA
def test_graphed_edit_is_repeatable_on_cuda(tiny_sd, z0, mask):
    """Two graphed edits of the same input agree (replays read this call's inputs and
    state, never a stale buffer); a second edit of another mask differs from the first
    the way the eager edits do."""
    model = _cuda_model(tiny_sd)
    compiling.compile_unet(model.unet, "graphs")
    z, m = z0.to("cuda"), mask
    _, a = fast_edit(model, z, m)
    _, b = fast_edit(model, z, m)
    assert rel(a.edit, b.edit) <= 1e-3
    m2 = torch.zeros_like(m)
    m2[:, 8:72, 8:72] = 1
    _, c = fast_edit(model, z, m2)
    compiling.compile_unet(model.unet, "off")
    _, c_eager = fast_edit(model, z, m2)
    assert rel(c.edit, c_eager.edit) <= 0.06


@CUDA
def test_graphed_null_text_matches_eager_on_cuda(tiny_sd, z0):
    """The seed-faithful inversion graphed (the DDIM trajectory, null-text's
    forward+backward, its conditional and guided passes) against eager, fp16 on the
    GPU: the trajectory's tolerance (1%) on the null embeddings and the latents."""
    model = _cuda_model(tiny_sd)
    z = z0.to("cuda")
    eager = inversion.invert(model, z, SRC, method="null_text", steps=STEPS, inner_steps=3)
    compiling.compile_unet(model.unet, "graphs")
    before = dict(graphs.TOTALS)
    got = inversion.invert(model, z, SRC, method="null_text", steps=STEPS, inner_steps=3)
    used = {k: v - before.get(k, 0) for k, v in graphs.TOTALS.items()}
    compiling.compile_unet(model.unet, "off")
    assert used.get("null-text.replay", 0) >= 1 and not any(
        k.endswith(".eager") for k in used), used
    assert rel(got.latents, eager.latents) <= 0.01
    assert rel(got.null_embeddings, eager.null_embeddings) <= 0.01
