"""The training nodes: modules trained by a real (short) run of the engine, loaded by the
loader node, change the edit the graph makes; untrained modules leave it exactly as it
was; the in-graph training node trains on the graph's pairs inside ComfyUI's inference
mode, leaves the host's random state as it was, reports progress, stops on cancel and
returns a loss plot; folders that are not trained-modules folders get errors that say what
is missing and how to make one."""

from __future__ import annotations

import json
import types

import pytest
import torch

from xmgie.mgie_core import host, paths, tiny
from xmgie.mgie_core.errors import InputError, ModelNotFoundError, XMGIEError
from xmgie.mgie_core.trainable import IdentityInjection, PFBWeights
from xmgie.mgie_core.trained import save_xmgie
from xmgie.nodes import editing
from xmgie.nodes import training as tn
from xmgie.runner import core_nodes

SIZE = 64           # training pairs
EDIT_SIZE = 128     # the edited photo: PFB's 16x16 and 8x8 sites (at 512 px) need a mask
                    # that survives at 4x4 and 2x2
SRC, TGT = "a red square on a grey wall", "a blue square on a grey wall"


@pytest.fixture(scope="module")
def photo():
    return torch.rand(1, EDIT_SIZE, EDIT_SIZE, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def box():
    m = torch.zeros(1, EDIT_SIZE, EDIT_SIZE)
    m[:, 16:112, 24:104] = 1
    return m


@pytest.fixture(scope="module")
def encoder(tiny_root, tiny_models):
    from xmgie.mgie_core.models import identity as idm

    tiny_models("clip_vision")
    paths.configure(reset=True)
    paths.configure(models_dir=[tiny_root])
    try:
        return idm.load_identity_encoder("clip_vision", "tiny-clip-vision")
    finally:
        paths.configure(reset=True)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_root, tiny_sd, encoder):
    """The final/ folder of a real run of the engine: the shipped xMGIE config (tiny
    section: LoRA on the UNet, a small critic), 4 steps on 4 synthetic pairs."""
    from xmgie.training import config, engine, synthetic

    folder = tmp_path_factory.mktemp("trained-run")
    synthetic.make_synthetic(folder / "pairs", n=4, size=SIZE)
    cfg = config.load_config("xmgie", tiny=True, overrides={
        "batch": {"global": 2, "per_device": 2}, "data": {"val_fraction": 0.0},
        "steps": {"max": 4, "val_every": 0, "checkpoint_every": 0},
        "early_stopping": {"metric": None}})
    result = engine.train(cfg, folder / "run", dataset=str(folder / "pairs"),
                          models={"sd": tiny_sd, "identity": encoder})
    assert result.final_dir is not None and result.steps == 4
    return result.final_dir


def _edit(sd, photo, box, controls):
    """The two-branch edit through the nodes (invert, sample), as a template wires it."""
    inv = editing.Invert().invert(sd, photo, SRC, "direct", 3, 7.5, 1)
    inv = (inv["result"] if isinstance(inv, dict) else inv)[0]
    out = editing.CAMSampler().sample(sd, inv, TGT, "", "", "logits", 0.8, 0.5, True,
                                      mask=box, controls=controls)
    return (out["result"] if isinstance(out, dict) else out)[0]["samples"]


def _trained_graph(sd, photo, box, encoder, trained):
    """Apply Trained UNet -> Trained Identity Injection -> PFB (trained) -> sampler."""
    (sd_trained,) = tn.ApplyTrainedUNet().apply(sd, trained)
    (chain,) = tn.IdentityInjectionNode().make(encoder, trained, image=photo)
    (chain,) = editing.PFBControlNode().make(controls=chain, trained=trained)
    return _edit(sd_trained, photo, box, chain)


@pytest.fixture(scope="module")
def baseline(tiny_sd, photo, box):
    (chain,) = editing.PFBControlNode().make()
    return _edit(tiny_sd, photo, box, chain)


def test_a_trained_checkpoint_loaded_by_the_node_changes_the_edit(
        trained_run, tiny_sd, photo, box, encoder, baseline):
    meta = json.loads((trained_run / "trained.json").read_text())
    assert meta["kind"] == "xmgie" and (trained_run / "unet_lora").is_dir()
    (trained,) = tn.LoadTrained().load(str(trained_run))
    assert trained.kind == "xmgie" and trained.pfb is not None and trained.ie is not None
    # The run moved the modules away from their initial values.
    assert (trained.pfb().detach() < 1).any()
    assert any(p.detach().abs().max() > 0 for p in trained.ie.parameters())

    unet_before = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    edited = _trained_graph(tiny_sd, photo, box, encoder, trained)
    assert torch.isfinite(edited).all()
    assert (edited - baseline).abs().max() > 1e-3
    # Each part acts alone too: the trained a_l, and the merged UNet adapter.
    (chain,) = editing.PFBControlNode().make(trained=trained)
    assert not torch.equal(_edit(tiny_sd, photo, box, chain), baseline)
    (sd_trained,) = tn.ApplyTrainedUNet().apply(tiny_sd, trained)
    assert sd_trained.unet is not tiny_sd.unet and sd_trained.vae is tiny_sd.vae
    assert not torch.equal(sd_trained.unet.state_dict()[TO_Q], unet_before[TO_Q])
    # The model the graph (or a model cache) holds is never changed.
    after = tiny_sd.unet.state_dict()
    assert after.keys() == unet_before.keys()
    assert all(torch.equal(after[k], v) for k, v in unet_before.items())


def test_untrained_modules_leave_the_edit_exactly_as_it_was(tmp_path, tiny_sd, photo, box,
                                                             encoder, baseline):
    pfb = PFBWeights.for_unet(tiny_sd.unet)
    ie = IdentityInjection.for_unet(tiny_sd.unet, encoder.model.config.projection_dim,
                                    encoder_kind=encoder.kind)
    save_xmgie(tmp_path / "init", pfb, ie)
    (trained,) = tn.LoadTrained().load(str(tmp_path / "init"))
    assert torch.equal(_trained_graph(tiny_sd, photo, box, encoder, trained), baseline)


TO_Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"


def test_the_tiny_trained_folder_is_what_tiny_mode_finds(tiny_root, clean_paths, tiny_sd):
    tiny.ensure_tiny_models(tiny_root, ["xmgie_trained"])
    paths.configure(tiny_root=tiny_root)
    assert tn.LoadTrained.INPUT_TYPES()["required"]["trained_name"][0] == ["xmgie-trained"]
    (trained,) = tn.LoadTrained().load("any name")
    assert trained.folder == tiny.tiny_path(tiny_root, "xmgie_trained")
    assert trained.pfb is not None and (trained.pfb().detach() < 1).all()
    # Its UNet adapter fits the tiny SD model and changes its weights (in a copy).
    (sd,) = tn.ApplyTrainedUNet().apply(tiny_sd, trained)
    assert not torch.equal(sd.unet.state_dict()[TO_Q], tiny_sd.unet.state_dict()[TO_Q])


def test_trained_mgie_parts_applied_by_the_node_change_the_instruction_edit(
        tmp_path, tiny_root, clean_paths, monkeypatch):
    from xmgie.nodes import loaders
    from xmgie.nodes import mgie as mgie_nodes
    from xmgie.training import config, engine
    from xmgie.training.mgie_task import TINY_FAMILIES

    tiny.ensure_tiny_models(tiny_root, TINY_FAMILIES)
    monkeypatch.setenv(tiny.ENV_TINY_DIR, str(tiny_root))
    paths.configure(tiny_root=tiny_root)
    (mgie,) = mgie_nodes.LoadMGIE().load("mgie_7b", "auto")
    (base,) = loaders.LoadDiffusers().load(model="stable-diffusion-v1-5")
    (sd,) = loaders.LoadMGIEUNet().load(base, "unet.pt")
    cfg = config.load_config("mgie", tiny=True, overrides={
        "steps.val_every": 0, "early_stopping.metric": None})
    final = engine.train(cfg, tmp_path / "run", max_steps=2,
                         models={"mgie": mgie, "sd": sd}).final_dir
    paths.configure(reset=True)
    (trained,) = tn.LoadTrained().load(str(final))
    assert trained.kind == "mgie"
    photo = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))

    def edit(m, s):
        cond, _ = mgie_nodes.MGIEInstruction().instruct(m, photo, "make the square red", 4)
        out = editing.InstructSampler().sample(s, photo, cond, 3, 7.5, 1.5, 0, "", True)
        return (out["result"] if isinstance(out, dict) else out)[0]["samples"]

    before = edit(mgie, sd)
    unet_before = sd.unet.state_dict()["conv_in.weight"].clone()
    new_mgie, new_sd = tn.ApplyTrainedMGIE().apply(mgie, sd, trained)
    assert new_mgie is not mgie and new_sd.unet is not sd.unet
    assert (edit(new_mgie, new_sd) - before).abs().max() > 1e-3
    # The given models (a cache may share them) edit as before.
    assert torch.equal(sd.unet.state_dict()["conv_in.weight"], unet_before)
    assert torch.equal(edit(mgie, sd), before)


# --- the in-graph training node -----------------------------------------------------------

@pytest.fixture
def pairs():
    from xmgie.training import synthetic

    made = [synthetic.make_pair(i, SIZE, 0) for i in range(2)]

    def batch(key):
        return torch.stack([torch.from_numpy(p[key]).float() / 255 for p in made])

    return batch("source"), batch("target"), batch("mask")


def _train_node(tmp_path, tiny_sd, encoder, pairs, steps=3):
    source, target, mask = pairs
    with core_nodes.using_context(core_nodes.RunContext(output_dir=tmp_path)), \
            torch.inference_mode():     # as ComfyUI runs every node
        return tn.TrainEditModules().train(
            tiny_sd, source, target, "make the square blue\nmake the circle red", steps,
            1e-3, 0, "xmgie", mask=mask, source_prompt="a shape on a wall",
            identity_encoder=encoder, resolution=SIZE, batch_size=2, run_name="t")


def _random_state():
    """The process-wide generators a host draws from (Python, NumPy, torch)."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _same_random_state(a, b) -> bool:
    import numpy as np

    return (a["python"] == b["python"] and a.keys() == b.keys()
            and all(np.array_equal(x, y) for x, y in zip(a["numpy"], b["numpy"]))
            and torch.equal(a["torch"], b["torch"])
            and all(torch.equal(x, y) for x, y in zip(a.get("cuda", []), b.get("cuda", []))))


def test_the_training_node_trains_on_the_graphs_pairs_in_inference_mode(
        tmp_path, tiny_root, clean_paths, tiny_sd, encoder, pairs, photo, box, baseline):
    import random

    import numpy as np

    paths.configure(tiny_root=tiny_root)       # as under xmgie run --tiny
    seen = []
    previous = host.set_hooks(progress=lambda total, desc: _Bar(total, seen))
    random.seed(1234)                          # the host's own draws (ComfyUI's samplers)
    np.random.seed(1234)
    torch.manual_seed(1234)
    before = _random_state()
    try:
        out = _train_node(tmp_path, tiny_sd, encoder, pairs)
    finally:
        host.set_hooks(**{"progress": previous.progress})
    # The run seeded the generators (seed 0); the host's states are as they were.
    assert _same_random_state(_random_state(), before)
    trained, plot, folder = out["result"]
    assert trained.kind == "xmgie" and trained.pfb is not None
    assert plot.shape == (1, tn.PLOT_SIZE[1], tn.PLOT_SIZE[0], 3)
    assert plot.dtype == torch.float32 and 0 <= plot.min() and plot.max() <= 1
    assert (plot < 0.9).any()                               # something is drawn
    run = tmp_path / "t_00001"
    assert folder.startswith(str(run)) and (run / "train" / "final" / "trained.json").is_file()
    rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # It trained on the graph's 2 pairs (one batch of 2 is a whole epoch), also under
    # tiny mode, whose runs otherwise train on a synthetic set of 16 written into the run.
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert not (run / "train" / "synthetic").exists()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (run / "pairs" / "manifest.jsonl").is_file()
    given = json.loads((run / "train" / "config.json").read_text())["models_given"]
    assert given["sd"] == str(tiny_sd.source)                # what it trained with
    assert seen == [(3, 1), (3, 1), (3, 1)]                  # one update per step
    # What it outputs edits as the loaded folder does.
    edited = _trained_graph(tiny_sd, photo, box, encoder, trained)
    assert (edited - baseline).abs().max() > 1e-3


class _Bar:
    def __init__(self, total, seen):
        self.total, self.seen = total, seen

    def update(self, n=1):
        self.seen.append((self.total, n))

    def close(self):
        pass


def test_the_training_node_stops_on_cancel_and_keeps_a_checkpoint(
        tmp_path, tiny_root, clean_paths, tiny_sd, encoder, pairs):
    paths.configure(tiny_root=tiny_root)
    calls = []

    def cancel_after_first_step():
        calls.append(1)
        if len(calls) > 1:
            raise host.Interrupted("cancelled")

    previous = host.set_hooks(check_interrupt=cancel_after_first_step)
    try:
        with pytest.raises(host.Interrupted):
            _train_node(tmp_path, tiny_sd, encoder, pairs, steps=50)
    finally:
        host.set_hooks(check_interrupt=previous.check_interrupt)
    train = tmp_path / "t_00001" / "train"
    assert list(train.glob("checkpoint-*")) and not (train / "final").exists()


class _CancellingBar(_Bar):
    """A bar whose update raises on cancel, as ComfyUI's ProgressBar does (its server's
    progress hook calls throw_exception_if_processing_interrupted)."""

    def update(self, n=1):
        super().update(n)
        if len(self.seen) > 1:
            raise host.Interrupted("cancelled")


def test_a_cancel_raised_by_the_progress_bar_still_keeps_a_checkpoint(
        tmp_path, tiny_root, clean_paths, tiny_sd, encoder, pairs):
    paths.configure(tiny_root=tiny_root)
    seen = []
    previous = host.set_hooks(progress=lambda total, desc: _CancellingBar(total, seen))
    try:
        with pytest.raises(host.Interrupted):
            _train_node(tmp_path, tiny_sd, encoder, pairs, steps=50)
    finally:
        host.set_hooks(progress=previous.progress)
    assert len(seen) == 2
    train = tmp_path / "t_00001" / "train"
    assert [p.name for p in train.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (train / "final").exists()


def test_the_training_node_checks_its_pairs_before_writing_anything(tmp_path, tiny_sd, pairs):
    source, target, _ = pairs
    node = tn.TrainEditModules()
    with core_nodes.using_context(core_nodes.RunContext(output_dir=tmp_path)):
        with pytest.raises(InputError, match="target: has shape"):
            node.train(tiny_sd, source, target[:1], "x", 2, 1e-3, 0, "xmgie")
        with pytest.raises(InputError, match="instruction: has 3 lines for 2 pairs"):
            node.train(tiny_sd, source, target, "a\nb\nc", 2, 1e-3, 0, "xmgie")
        with pytest.raises(InputError, match=r"instruction: is empty for pair\(s\) \[0, 1\]"):
            node.train(tiny_sd, source, target, " ", 2, 1e-3, 0, "xmgie")
    assert not list(tmp_path.iterdir())


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(
        tmp_path, clean_paths, tiny_sd, pairs):
    source, target, mask = pairs
    node = tn.TrainEditModules()
    with core_nodes.using_context(core_nodes.RunContext(output_dir=tmp_path)), \
            torch.inference_mode():
        # A setting the task refuses (the full config's critic needs 192 px) is found
        # before anything is written.
        with pytest.raises(InputError, match="model.critic.n_layers"):
            node.train(tiny_sd, source, target, "make it red", 2, 1e-3, 0, "xmgie",
                       resolution=64)
        # No identity encoder connected and none on disk (not tiny mode): the config's
        # encoder is not found after the pairs were written; the run folder goes too.
        with pytest.raises(XMGIEError, match="clip-vit-large-patch14"):
            node.train(tiny_sd, source, target, "make it red", 2, 1e-3, 0, "xmgie",
                       mask=mask, resolution=192, batch_size=2)
    assert not list(tmp_path.iterdir())


def test_the_loss_plot_draws_each_term():
    rows = [{"step": s, "loss": 2.0 / s, "l_recon": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    plot = tn.loss_plot(rows)
    assert plot.shape == (1, 360, 640, 3)
    blue = (plot[0, ..., 2] > 0.6) & (plot[0, ..., 0] < 0.3)          # the total's colour
    assert blue.sum() > 100
    empty = tn.loss_plot([])
    assert empty.shape == plot.shape and not torch.equal(empty, plot)


def test_a_trained_folder_rewritten_halfway_keeps_its_complete_files(tmp_path, monkeypatch):
    import safetensors.torch

    from xmgie.mgie_core import trained as trained_lib

    pfb = PFBWeights(["mid_block"])
    save_xmgie(tmp_path, pfb, None)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(files) == {trained_lib.MANIFEST, trained_lib.WEIGHTS}

    def fail_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_halfway)
    with torch.no_grad():
        pfb.raw.fill_(-1.0)
    with pytest.raises(OSError, match="disk full"):
        save_xmgie(tmp_path, pfb, None, extra={"steps": 7})
    # The old folder, whole: no partial weights, no temporary file left behind.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert trained_lib.load_xmgie(tmp_path).pfb is not None


# --- errors -------------------------------------------------------------------------------

def test_a_folder_that_is_not_a_trained_modules_folder_says_so(tmp_path, clean_paths):
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"has no trained\.json.*xmgie train"):
        tn.LoadTrained().load(str(tmp_path / "plain"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "trained.json").write_text('{"kind": "lora"}')
    with pytest.raises(InputError, match="kind 'lora'"):
        tn.LoadTrained().load(str(tmp_path / "other"))
    # Found by name in the xmgie_trained folder of a models dir, the same error.
    (tmp_path / "models" / "xmgie_trained" / "empty").mkdir(parents=True)
    paths.configure(models_dir=[tmp_path / "models"])
    with pytest.raises(InputError, match="has no trained.json"):
        tn.LoadTrained().load("empty")
    with pytest.raises(ModelNotFoundError, match="xmgie_trained"):
        tn.LoadTrained().load("missing")


def test_modules_of_the_wrong_kind_are_named(tmp_path):
    mgie = tn.TrainedModules("mgie", tmp_path)
    with pytest.raises(InputError, match="trained: holds MGIE modules"):
        editing.PFBControlNode().make(trained=mgie)
    with pytest.raises(InputError, match="trained: holds MGIE modules"):
        tn.IdentityInjectionNode().make(None, mgie)
    weights = PFBWeights(["mid_block"], preset="background")
    background = tn.TrainedModules("xmgie", tmp_path, types.SimpleNamespace(pfb=weights))
    with pytest.raises(InputError, match="Set the PFB node's preset to background"):
        editing.PFBControlNode().make(trained=background)
    (chain,) = editing.PFBControlNode().make(trained=background, preset="background")
    assert chain[0].alpha is weights
    xmgie = tn.TrainedModules("xmgie", tmp_path)
    with pytest.raises(InputError, match="trained: holds xMGIE modules"):
        tn.ApplyTrainedMGIE().apply(None, None, xmgie)


# --- inside a real ComfyUI (skipped unless XMGIE_COMFYUI_DIR names a checkout) ------------

COMFY_DIR = __import__("os").environ.get("XMGIE_COMFYUI_DIR")


@pytest.fixture
def comfyui(tiny_root, tiny_models, tmp_path):
    """ComfyUI (CPU mode) with the adapter installed, its output folder in ``tmp_path``;
    the library's standalone hooks, registry and folders are restored afterwards (as
    tests/test_comfy_adapter.py does)."""
    import sys

    from xmgie.mgie_core import memory

    if not COMFY_DIR:
        pytest.skip("set XMGIE_COMFYUI_DIR to a ComfyUI checkout to run the node inside it")
    sys.path.insert(0, COMFY_DIR)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.model_patcher  # ComfyUI has it loaded when it loads packs
    import folder_paths

    from xmgie.nodes import _comfy

    tiny_models("sd_diffusers")
    tiny_models("clip_vision")
    previous, previous_registry = host.hooks(), memory._registry
    previous_output = folder_paths.get_output_directory()
    memory._registry = memory.ModelRegistry()
    _comfy._installed = False
    assert _comfy.install()
    folder_paths.set_output_directory(str(tmp_path))
    paths.configure(tiny_root=tiny_root)
    try:
        yield mm
    finally:
        mm.unload_all_models()
        folder_paths.set_output_directory(previous_output)
        host.set_hooks(**vars(previous))
        memory._registry = previous_registry
        _comfy._installed = False
        paths.set_comfy_provider(None)
        paths.configure(reset=True)


def test_inside_comfyui_the_node_trains_under_its_progress_bar_and_stops_on_cancel(
        comfyui, tmp_path, pairs):
    import comfy.utils
    import folder_paths

    from xmgie.nodes import NODE_CLASS_MAPPINGS as nodes

    mm = comfyui
    assert "xmgie_trained" in folder_paths.folder_names_and_paths   # the models folder
    with torch.inference_mode():                 # as ComfyUI runs every node
        (sd,) = nodes["XMGIELoadDiffusers"]().load(model="stable-diffusion-v1-5",
                                                   dtype="fp32")
        (enc,) = nodes["XMGIELoadIdentityEncoder"]().load("clip_vision",
                                                          "clip-vit-large-patch14")
    source, target, mask = pairs
    args = (sd, source, target, "make the shape blue", 3, 1e-3, 0, "xmgie")
    kwargs = dict(mask=mask, identity_encoder=enc, resolution=SIZE, batch_size=2)
    steps = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             steps.append((value, total)))
    try:
        with torch.inference_mode():
            out = nodes["XMGIETrainEditModules"]().train(*args, **kwargs)
        assert steps == [(1, 3), (2, 3), (3, 3)]          # ComfyUI's ProgressBar
        assert out["result"][0].kind == "xmgie"
        assert (tmp_path / "xmgie_train_00001" / "train" / "final").is_dir()
        # ComfyUI's cancel button during the first step: a checkpoint, then its exception.
        # The server's progress hook raises it from the bar's update (main.py's hook).
        def cancel(value, total, preview, node_id=None):
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()

        comfy.utils.set_progress_bar_global_hook(cancel)
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            nodes["XMGIETrainEditModules"]().train(*args[:4], 50, *args[5:], **kwargs)
        run = tmp_path / "xmgie_train_00002" / "train"
        assert list(run.glob("checkpoint-*")) and not (run / "final").exists()
        assert not mm.processing_interrupted()             # ComfyUI's flag is cleared
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
