"""Hostile inputs, run through the headless runner (``xmgie run``) as a user would.

Every bad input a user might give: model folders that name code, damaged or incomplete
model files, NaN/Inf/out-of-range values, odd image files and paths, broken workflows,
and Ctrl-C.
Each run must fail with a non-zero exit code, an error naming the node and the input or
file, and no output file written. The models are the tiny random-weight ones, copied
into a models folder per test so that each test can damage its own copy.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from xmgie import cli
from xmgie.mgie_core import images as images_mod
from xmgie.mgie_core import tiny
from xmgie.runner import core_nodes

# --- test-only nodes: a sink (an output node for any value) and sources of bad values ---

SHOWN: list = []


class Show:
    """An output node that takes any value (the workflows below need an output)."""
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*", {})}}

    def show(self, value):
        SHOWN.append(value)
        return {"ui": {"text": [type(value).__name__]}}


BAD_KINDS = ["nan", "inf", "255", "minus1", "overshoot", "ok"]


def _bad(shape, kind):
    x = torch.rand(shape)
    if kind == "nan":
        x[..., 0, 0, :] = float("nan")
    elif kind == "inf":
        x[..., 0, 0, :] = float("inf")
    elif kind == "255":
        x = x * 255
    elif kind == "minus1":
        x = x * 2 - 1
    elif kind == "overshoot":   # what a bicubic upscale does at sharp edges
        x = x * 1.1 - 0.05
    return x


class BadImage:
    """An IMAGE as another node might hand it over: NaN, Inf, 0..255 or -1..1."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (BAD_KINDS, {})},
                "optional": {"size": ("INT", {"default": 128})}}

    def make(self, kind, size=128):
        return (_bad((1, size, size, 3), kind),)


class BadMask:
    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (BAD_KINDS, {})},
                "optional": {"size": ("INT", {"default": 128})}}

    def make(self, kind, size=128):
        m = torch.zeros(1, size, size)
        m[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
        if kind == "nan":
            m[0, 0, 0] = float("nan")
        return (m,)


class BadLatent:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (BAD_KINDS, {})}}

    def make(self, kind):
        z = torch.randn(1, 4, 16, 16)
        z[0, 0, 0, 0] = {"nan": float("nan"), "inf": float("inf")}.get(kind, 0.0)
        return ({"samples": z},)


class Pass:
    """INT in, INT out: links of it make long chains."""
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 0})}}

    def run(self, x):
        return (x,)


TEST_NODES = {"Show": Show, "BadImage": BadImage, "BadMask": BadMask, "BadLatent": BadLatent,
              "Pass": Pass}


@pytest.fixture(autouse=True)
def _registry(monkeypatch, clean_paths):
    real = cli.build_registry
    monkeypatch.setattr(cli, "build_registry", lambda: {**real(), **TEST_NODES})
    monkeypatch.delenv(images_mod.ENV_MAX_PIXELS, raising=False)
    images_mod.set_max_pixels(None)
    SHOWN.clear()
    yield
    images_mod.set_max_pixels(None)


# --- models, files and runs --------------------------------------------------------------

FAMILIES = ("sd_checkpoint", "sd_diffusers", "ip2p_diffusers", "mgie_unet", "mgie", "sam",
            "blip2", "vlm", "clip_vision", "face_recognition")


@pytest.fixture(scope="module")
def tiny_all(tiny_root, tiny_models):
    for family in FAMILIES + ("clip_tokenizer",):
        tiny_models(family)
    return tiny_root


@pytest.fixture
def models(tiny_all, tmp_path):
    """A models folder of our own; ``models.copy(family)`` copies a tiny model into it
    (with the side files it needs) and returns the copy's path."""
    root = tmp_path / "models"

    class Models:
        path = root

        def copy(self, family):
            if family == "mgie_unet" and not (root / "diffusers" / "tiny-sd15").exists():
                self.copy("sd_diffusers")   # the SD 1.5 base the MGIE UNet goes over
            src = tiny.tiny_path(tiny_all, family)
            dst = root / src.relative_to(tiny_all)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
            if family == "sd_checkpoint":  # its <stem>.config/ folder
                side = src.with_name(src.stem + ".config")
                shutil.copytree(side, dst.with_name(dst.stem + ".config"))
            return dst

    return Models()


def photo(folder: Path, name="photo.png", size=(128, 128)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    return folder / name


class Run:
    def __init__(self, tmp_path, models, capsys):
        self.tmp, self.models, self.capsys = tmp_path, models, capsys
        self.input = tmp_path / "input"
        self.output = tmp_path / "output"
        self.input.mkdir(exist_ok=True)

    def __call__(self, workflow: dict, *extra: str, command="run"):
        path = self.tmp / "wf" / "workflow.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(workflow))
        argv = [command, str(path), "--models-dir", str(self.models.path),
                "--input-dir", str(self.input)] + list(extra)
        if command == "run":
            argv += ["--output-dir", str(self.output)]
        code = cli.main(argv)
        err = self.capsys.readouterr().err
        return code, err

    def written(self) -> list[Path]:
        return sorted(p for p in self.output.rglob("*") if p.is_file()) \
            if self.output.exists() else []

    def fails(self, workflow, *needles, code=1, extra=()):
        """Run, expect failure with every needle in the message and nothing written."""
        got, err = self(workflow, *extra)
        assert got == code, err
        for needle in needles:
            assert needle in err, f"{needle!r} not in:\n{err}"
        assert "Traceback" not in err and "RecursionError" not in err
        assert self.written() == []
        return err


@pytest.fixture
def run(tmp_path, models, capsys):
    return Run(tmp_path, models, capsys)


def n(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def vae_roundtrip(loader: dict, image="photo.png") -> dict:
    """LoadImage -> loader -> VAE encode/decode -> SaveImage (node 2 is the loader)."""
    return {"1": n("LoadImage", image=image), "2": loader,
            "3": n("XMGIEVAEEncode", sd_model=["2", 0], image=["1", 0]),
            "4": n("XMGIEVAEDecode", sd_model=["2", 0], latent=["3", 0]),
            "5": n("SaveImage", images=["4", 0], filename_prefix="out")}


CKPT = n("XMGIELoadCheckpoint", ckpt_name="tiny-sd15.safetensors", dtype="fp32")
SD = n("XMGIELoadDiffusers", model="tiny-sd15", dtype="fp32")
IP2P = n("XMGIELoadInstructPix2Pix", model="tiny-ip2p", dtype="fp32")


def loader_workflow(family: str) -> tuple[dict, str]:
    """A workflow whose node 2 loads a model of ``family`` (and an output needing it);
    returns it with the loader's class name."""
    wf = {"1": n("LoadImage", image="photo.png")}
    if family in ("sd_checkpoint", "sd_diffusers", "ip2p_diffusers"):
        wf = vae_roundtrip({"sd_checkpoint": CKPT, "sd_diffusers": SD,
                            "ip2p_diffusers": IP2P}[family])
    elif family == "mgie_unet":
        wf.update({"3": SD, "2": n("XMGIELoadMGIEUNet", sd_model=["3", 0], unet_name="unet.pt"),
                   "4": n("Show", value=["2", 0])})
    elif family == "mgie":
        wf.update({"2": n("XMGIELoadMGIE", model="tiny-mgie", dtype="fp32"),
                   "3": n("XMGIEMGIEInstruction", mgie=["2", 0], image=["1", 0],
                          instruction="make it snowy", max_new_tokens=4),
                   "4": n("Show", value=["3", 0])})
    elif family == "sam":
        wf.update({"2": n("XMGIELoadSAM", sam_name="sam_vit_tiny.pth"),
                   "3": n("Show", value=["2", 0])})
    elif family == "blip2":
        wf.update({"2": n("XMGIELoadBLIP2", model="tiny-blip2", dtype="fp32"),
                   "3": n("XMGIECaption", captioner=["2", 0], image=["1", 0],
                          max_new_tokens=3, prompt="")})
    elif family == "vlm":
        wf.update({"2": n("XMGIELoadVLM", model="tiny-vlm", dtype="fp32"),
                   "3": n("XMGIEAskVLM", vlm=["2", 0], image=["1", 0], question="what?",
                          max_new_tokens=3),
                   "4": n("Show", value=["3", 0])})
    elif family in ("clip_vision", "face_recognition"):
        name = "tiny-clip-vision" if family == "clip_vision" else "arcface_tiny.pth"
        wf.update({"2": n("XMGIELoadIdentityEncoder", kind=family, model_name=name),
                   "3": n("XMGIEIdentityScore", identity_encoder=["2", 0], edited=["1", 0],
                          source=["1", 0], crop_margin=0.1)})
    loader = wf["2"]["class_type"]
    return wf, loader


def drop_keys(path: Path, pick, replace=None) -> list[str]:
    """Remove (or replace) the tensors whose names ``pick`` accepts in a weights file."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    dropped = sorted(k for k in state if pick(k))
    assert dropped, "the test must change something"
    for k in dropped:
        if replace is None:
            del state[k]
        else:
            state[k] = replace(state[k])
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return dropped


# --- critical: model folders never make the pack import or run code ----------------------

def plant_payload(folder: Path, module: str, marker: Path) -> None:
    (folder / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "class Model: pass\nclass Tok: pass\nclass Proc: pass\n")


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# (family, file inside the copied model to edit, how, what the error names)
CODE_CASES = [
    ("sd_checkpoint", "../tiny-sd15.config/model_index.json",
     lambda d, m: d.update(unet=[m, "UNet2DConditionModel"]), "model_index.json"),
    ("sd_checkpoint", "../tiny-sd15.config/model_index.json",
     lambda d, m: d.update(scheduler=[m, "DDIMScheduler"]), "model_index.json"),
    ("sd_checkpoint", "../tiny-sd15.config/text_encoder/config.json",
     lambda d, m: d.update(auto_map={"AutoModel": f"{m}.Model"}), "config.json"),
    ("sd_checkpoint", "../tiny-sd15.config/tokenizer/tokenizer_config.json",
     lambda d, m: d.update(auto_map={"AutoTokenizer": [f"{m}.Tok", None]}),
     "tokenizer_config.json"),
    ("sd_diffusers", "model_index.json",
     lambda d, m: d.update(vae=[m, "AutoencoderKL"]), "model_index.json"),
    ("sd_diffusers", "model_index.json",
     lambda d, m: d.update(custom_pipeline=m), "model_index.json"),
    ("sd_diffusers", "unet/config.json",
     lambda d, m: d.update(auto_map={"AutoModel": f"{m}.Model"}), "config.json"),
    ("ip2p_diffusers", "model_index.json",
     lambda d, m: d.update(text_encoder=[m, "CLIPTextModel"]), "model_index.json"),
    ("blip2", "config.json",
     lambda d, m: d.update(auto_map={"AutoModel": f"{m}.Model"}), "config.json"),
    ("blip2", "processor_config.json",
     lambda d, m: d.update(auto_map={"AutoProcessor": f"{m}.Proc"}), "processor_config.json"),
    ("vlm", "config.json",
     lambda d, m: d.update(auto_map={"AutoModelForImageTextToText": f"{m}.Model"}),
     "config.json"),
    ("vlm", "tokenizer_config.json",
     lambda d, m: d.update(auto_map={"AutoTokenizer": [f"{m}.Tok", None]}),
     "tokenizer_config.json"),
    ("clip_vision", "config.json",
     lambda d, m: d.update(auto_map={"AutoModel": f"{m}.Model"}), "config.json"),
    ("mgie", "LLaVA-7B-v1/config.json",
     lambda d, m: d.update(auto_map={"AutoModelForCausalLM": f"{m}.Model"}), "config.json"),
    ("mgie", "LLaVA-7B-v1/tokenizer_config.json",
     lambda d, m: d.update(auto_map={"AutoTokenizer": [f"{m}.Tok", None]}),
     "tokenizer_config.json"),
    ("mgie", "tiny-clip-vit/config.json",
     lambda d, m: d.update(auto_map={"AutoModel": f"{m}.Model"}), "config.json"),
]


@pytest.mark.parametrize("family, rel, change, names", CODE_CASES,
                         ids=[f"{c[0]}-{c[1].split('/')[-1]}-{i}"
                              for i, c in enumerate(CODE_CASES)])
def test_model_folders_never_import_code(run, models, tmp_path, monkeypatch,
                                         family, rel, change, names):
    module = f"xmgie_payload_{abs(hash((family, rel, names))) % 10**8}"
    marker = tmp_path / "MARKER"
    model = models.copy(family)
    target = (model / rel).resolve() if not rel.startswith("..") else \
        (model.parent / rel[3:]).resolve()
    _edit_json(target, lambda d: change(d, module))
    # The payload sits where each library would look for it: the working directory
    # (what diffusers' importlib finds, since `python -m` puts it on sys.path), the
    # model folder and the edited file's folder (where transformers looks for auto_map).
    home = tmp_path / "home"
    home.mkdir()
    for folder in {home, target.parent, model if model.is_dir() else model.parent}:
        plant_payload(folder, module, marker)
    monkeypatch.chdir(home)
    monkeypatch.syspath_prepend(str(home))
    photo(run.input)
    wf, loader = loader_workflow(family)
    run.fails(wf, f"({loader}) failed", names, "code")
    assert not marker.exists(), "a model folder made the pack import a module"
    assert module not in sys.modules


def test_model_index_with_an_unknown_component_class_is_refused(run, models):
    model = models.copy("sd_diffusers")
    _edit_json(model / "unet" / "config.json", lambda d: d.update(_class_name="MyUNet"))
    photo(run.input)
    run.fails(vae_roundtrip(SD), "node 2 (XMGIELoadDiffusers) failed", "unet",
              "config.json", '"MyUNet"')


# --- every weight accounted for, in every loader family ------------------------------------

KEY_CASES = [
    # family, file in the copy, keys to drop, what the error must name
    ("sd_checkpoint", "", "first_stage_model.decoder.up.", "first_stage_model.decoder.up."),
    ("sd_checkpoint", "", "model.diffusion_model.out.", "model.diffusion_model.out."),
    ("sd_checkpoint", "", "cond_stage_model.transformer.text_model.final_layer_norm",
     "final_layer_norm"),
    ("sd_diffusers", "vae/diffusion_pytorch_model.safetensors", "decoder.up_blocks.0.",
     "decoder.up_blocks.0."),
    ("sd_diffusers", "text_encoder/model.safetensors", "encoder.layers.1.",
     "layers.1."),
    ("ip2p_diffusers", "unet/diffusion_pytorch_model.safetensors", "conv_out.", "conv_out."),
    ("mgie_unet", "", "up_blocks.1.attentions.0.proj_out.", "up_blocks.1.attentions.0.proj_out"),
    ("mgie", "mllm.pt", "edit_head.hid2feat.bias", "edit_head.hid2feat.bias"),
    ("mgie", "LLaVA-7B-v1/model.safetensors", "model.layers.1.mlp.down_proj",
     "model.layers.1.mlp.down_proj"),
    ("mgie", "tiny-clip-vit/model.safetensors", "post_layernorm.", "post_layernorm"),
    ("sam", "", "image_encoder.neck.1.", "image_encoder.neck.1"),
    ("blip2", "model.safetensors", "qformer.encoder.layer.0.output_query.",
     "qformer.encoder.layer.0.output_query"),
    ("vlm", "model.safetensors", "multi_modal_projector.linear_2.",
     "multi_modal_projector.linear_2"),
    ("clip_vision", "model.safetensors", "visual_projection.", "visual_projection"),
    ("face_recognition", "", "features.", "features."),
]


@pytest.mark.parametrize("family, rel, prefix, names", KEY_CASES,
                         ids=[f"{c[0]}-{c[2].rstrip('.')}" for c in KEY_CASES])
def test_missing_weights_are_an_error_naming_file_and_keys(run, models, family, rel, prefix,
                                                          names):
    model = models.copy(family)
    path = model / rel if rel else model
    drop_keys(path, lambda k: k.startswith(prefix) or k.endswith("." + prefix))
    photo(run.input)
    wf, loader = loader_workflow(family)
    err = run.fails(wf, f"({loader}) failed", "weights missing", names)
    assert path.name in err or str(path.parent) in err


@pytest.mark.parametrize("family, rel", [
    ("sd_checkpoint", ""), ("sd_diffusers", "unet/diffusion_pytorch_model.safetensors"),
    ("mgie_unet", ""), ("sam", ""), ("clip_vision", "model.safetensors"),
    ("face_recognition", ""), ("blip2", "model.safetensors")])
def test_unexpected_weights_are_an_error(run, models, family, rel):
    model = models.copy(family)
    path = model / rel if rel else model
    state = load_file(str(path)) if path.suffix == ".safetensors" else \
        torch.load(path, weights_only=True)
    key = ("model.diffusion_model.not_a_layer.weight" if family == "sd_checkpoint"
           else "not_a_layer.weight")
    state[key] = torch.zeros(3)
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    photo(run.input)
    wf, loader = loader_workflow(family)
    run.fails(wf, f"({loader}) failed", "unexpected weights", "not_a_layer.weight")


def test_wrong_shape_in_a_checkpoint_names_the_tensor(run, models):
    model = models.copy("sd_checkpoint")
    drop_keys(model, lambda k: k == "model.diffusion_model.out.2.weight",
              replace=lambda t: torch.zeros(t.shape[0], t.shape[1] + 1, *t.shape[2:]))
    photo(run.input)
    run.fails(vae_roundtrip(CKPT), "(XMGIELoadCheckpoint) failed", "wrong shape",
              "model.diffusion_model.out.2.weight", "tiny-sd15.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "pickle", "wrong_shape", "safetensors_cut"])
def test_mgie_unet_errors_name_the_file(run, models, damage):
    path = models.copy("mgie_unet")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "pickle":   # a pickle that runs code when unpickled without weights_only
        marker = path.parent / "PICKLE_RAN"

        class Payload:
            def __reduce__(self):
                return (Path.write_text, (marker, "ran"))

        torch.save({"conv_in.weight": torch.zeros(1), "x": Payload()}, path)
    elif damage == "wrong_shape":
        drop_keys(path, lambda k: k == "conv_out.weight",
                  replace=lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]))
    else:
        state = torch.load(path, weights_only=True)
        path = path.with_name("unet.safetensors")
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[:3000])
    photo(run.input)
    wf, _ = loader_workflow("mgie_unet")
    wf["2"]["inputs"]["unet_name"] = path.name
    run.fails(wf, "(XMGIELoadMGIEUNet) failed", str(path))
    assert not (path.parent / "PICKLE_RAN").exists()


def test_legacy_feature_extractor_names_are_not_mistaken_for_code(run, models):
    """OpenAI CLIP's published preprocessor_config.json still says CLIPFeatureExtractor,
    a name transformers 5 reads as CLIPImageProcessor: it is not custom code."""
    model = models.copy("clip_vision")
    _edit_json(model / "preprocessor_config.json", lambda d: (
        d.pop("image_processor_type"), d.update(feature_extractor_type="CLIPFeatureExtractor")))
    photo(run.input)
    wf, _ = loader_workflow("clip_vision")
    code, err = run(wf)
    assert code == 0, err


def test_checkpoint_with_optional_keys_still_loads(run, models):
    """The documented allow-list: DDPM buffers, EMA weights, position_ids."""
    model = models.copy("sd_checkpoint")
    state = load_file(str(model))
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["model_ema.decay"] = torch.tensor(0.999)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77)[None]
    save_file(state, str(model))
    photo(run.input)
    code, err = run(vae_roundtrip(CKPT))
    assert code == 0, err
    assert len(run.written()) == 1


# --- non-finite and out-of-range values are refused before anything is written -------------

@pytest.fixture
def sd_models(models):
    models.copy("sd_diffusers")
    models.copy("ip2p_diffusers")
    return models


@pytest.mark.parametrize("kind, words", [("nan", "NaN"), ("inf", "infinite")])
def test_non_finite_latent_into_vae_decode(run, sd_models, kind, words):
    wf = {"2": SD, "3": n("BadLatent", kind=kind),
          "4": n("XMGIEVAEDecode", sd_model=["2", 0], latent=["3", 0]),
          "5": n("SaveImage", images=["4", 0], filename_prefix="out")}
    run.fails(wf, "node 4 (XMGIEVAEDecode) failed", "latent", words)


def test_vae_whose_weights_give_nan_is_refused_at_decode(run, models):
    model = models.copy("sd_checkpoint")
    drop_keys(model, lambda k: k == "first_stage_model.decoder.conv_out.bias",
              replace=lambda t: torch.full_like(t, float("nan")))
    photo(run.input)
    run.fails(vae_roundtrip(CKPT), "node 4 (XMGIEVAEDecode) failed", "decoded image", "NaN")


def test_vae_encoder_giving_inf_is_refused_at_encode(run, models):
    model = models.copy("sd_checkpoint")
    drop_keys(model, lambda k: k == "first_stage_model.quant_conv.bias",
              replace=lambda t: torch.full_like(t, float("inf")))
    photo(run.input)
    run.fails(vae_roundtrip(CKPT), "node 3 (XMGIEVAEEncode) failed", "encoded latent",
              "infinite")


def test_resampling_overshoot_is_still_an_image(run):
    wf = {"1": n("BadImage", kind="overshoot", size=16), "2": n("BadMask", kind="ok", size=16),
          "3": n("XMGIEGBBlur", image=["1", 0], mask=["2", 0], sigma_max=3.0, sigma_s=5.0),
          "4": n("SaveImage", images=["3", 0], filename_prefix="out")}
    code, err = run(wf)
    assert code == 0, err
    assert len(run.written()) == 1


@pytest.mark.parametrize("kind, words", [("nan", "NaN"), ("inf", "infinite"),
                                         ("255", "0..255"), ("minus1", "-1..1")])
def test_bad_image_into_save_image(run, kind, words):
    wf = {"1": n("BadImage", kind=kind, size=16),
          "2": n("SaveImage", images=["1", 0], filename_prefix="out")}
    run.fails(wf, "node 2 (SaveImage) failed", "images", words)


@pytest.mark.parametrize("kind, words", [("nan", "NaN"), ("255", "0..255")])
def test_bad_image_through_gb_blur(run, kind, words):
    wf = {"1": n("BadImage", kind=kind), "2": n("BadMask", kind="ok"),
          "3": n("XMGIEGBBlur", image=["1", 0], mask=["2", 0], sigma_max=3.0, sigma_s=5.0),
          "4": n("SaveImage", images=["3", 0], filename_prefix="out")}
    run.fails(wf, "node 3 (XMGIEGBBlur) failed", "image", words)


def test_nan_mask_through_gb_blur(run):
    wf = {"1": n("BadImage", kind="ok"), "2": n("BadMask", kind="nan"),
          "3": n("XMGIEGBBlur", image=["1", 0], mask=["2", 0], sigma_max=3.0, sigma_s=5.0),
          "4": n("SaveImage", images=["3", 0], filename_prefix="out")}
    run.fails(wf, "node 3 (XMGIEGBBlur) failed", "mask", "NaN")


def _instruct_edit(image_node: dict, loader=IP2P, steps=2) -> dict:
    return {"1": image_node, "2": loader,
            "3": n("XMGIEEncodeInstruction", sd_model=["2", 0], instruction="make it red"),
            "4": n("XMGIEInstructSampler", sd_model=["2", 0], image=["1", 0],
                   conditioning=["3", 0], steps=steps, text_scale=7.5, image_scale=1.5, seed=0,
                   cam_in_words="", batched=True),
            "5": n("XMGIEVAEDecode", sd_model=["2", 0], latent=["4", 0]),
            "6": n("SaveImage", images=["5", 0], filename_prefix="out")}


@pytest.mark.parametrize("kind, words", [("nan", "NaN"), ("255", "0..255")])
def test_bad_image_through_the_edit(run, sd_models, kind, words):
    run.fails(_instruct_edit(n("BadImage", kind=kind)),
              "node 4 (XMGIEInstructSampler) failed", "image", words)
    wf = {"1": n("BadImage", kind=kind), "2": SD,
          "3": n("XMGIEInvert", sd_model=["2", 0], image=["1", 0], source_prompt="a cat",
                 method="direct", steps=2, guidance=7.5, inner_steps=1),
          "4": n("Show", value=["3", 0])}
    run.fails(wf, "node 3 (XMGIEInvert) failed", "image", words)


def test_unet_giving_nan_is_refused_at_the_sampler(run, models):
    model = models.copy("ip2p_diffusers")
    drop_keys(model / "unet" / "diffusion_pytorch_model.safetensors",
              lambda k: k == "conv_out.bias", replace=lambda t: torch.full_like(t, float("nan")))
    photo(run.input)
    # One step: NaN flowing through a whole UNet is very slow on a CPU.
    run.fails(_instruct_edit(n("LoadImage", image="photo.png"), steps=1),
              "node 4 (XMGIEInstructSampler) failed", "edited latent", "NaN")


# --- Save Image: ComfyUI's prefixes, exclusive and atomic files -----------------------------

@pytest.mark.parametrize("prefix", ["", "."])
def test_empty_and_dot_prefix_write_inside_the_output_folder(run, prefix):
    wf = {"1": n("BadImage", kind="ok", size=8),
          "2": n("SaveImage", images=["1", 0], filename_prefix=prefix)}
    code, err = run(wf)
    assert code == 0, err
    # ComfyUI's get_save_image_path: normpath("") == "." -> file "._00001_.png" in output.
    assert run.written() == [run.output.resolve() / "._00001_.png"]


def test_prefix_variables_are_expanded_like_comfyui(run):
    import time

    prefix = "%year%/%width%x%height%_b%batch_num%"
    wf = {"1": n("BadImage", kind="ok", size=8),
          "2": n("SaveImage", images=["1", 0], filename_prefix=prefix)}
    code, err = run(wf)
    assert code == 0, err
    year = time.localtime().tm_year
    assert [p.relative_to(run.output.resolve()).as_posix() for p in run.written()] == \
        [f"{year}/8x8_b0_00001_.png"]


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs/escape", "a/../../escape"])
def test_prefix_outside_the_output_folder_is_refused(run, prefix):
    wf = {"1": n("BadImage", kind="ok", size=8),
          "2": n("SaveImage", images=["1", 0], filename_prefix=prefix)}
    run.fails(wf, "node 2 (SaveImage) failed", "filename_prefix", "outside the output folder")


def test_two_saves_at_the_same_moment_keep_both_images(tmp_path):
    out = tmp_path / "out"
    rounds, errors = 10, []
    for r in range(rounds):
        barrier = threading.Barrier(2)

        def save(value, barrier=barrier):
            try:
                img = torch.full((1, 8, 8, 3), value)
                barrier.wait()
                core_nodes.save_images(img, out, "race")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(v,)) for v in (r / 40, 0.5 + r / 40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    files = sorted(out.glob("race_*_.png"))
    assert len(files) == 2 * rounds
    values = sorted(int(np.asarray(Image.open(f))[0, 0, 0]) for f in files)
    assert len(set(values)) == 2 * rounds, "one save overwrote another"
    assert not list(out.glob(".*")), "temporary files left behind"


def test_interrupted_save_leaves_no_file(run, monkeypatch):
    real_save = Image.Image.save

    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)   # part of a PNG, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    wf = {"1": n("BadImage", kind="ok", size=8),
          "2": n("SaveImage", images=["1", 0], filename_prefix="out")}
    code, err = run(wf)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert code == cli.EXIT_INTERRUPTED
    assert run.written() == [] and not [p for p in run.output.rglob("*") if p.is_file()]


# --- image files: size limit, damaged files, animations, tiny images, paths ----------------

def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height and which holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _load_and_save(image="photo.png"):
    return {"1": n("LoadImage", image=image),
            "2": n("SaveImage", images=["1", 0], filename_prefix="out")}


def test_image_above_the_pixel_limit_is_refused_before_decoding(run, monkeypatch):
    header_only_png(run.input / "bomb.png", 9000, 9000)   # 81 MP, no data to decode
    err = run.fails(_load_and_save("bomb.png"), "node 1 (LoadImage) failed", "bomb.png",
                    "9000x9000", "XMGIE_MAX_IMAGE_PIXELS")
    assert "truncated" not in err   # refused from the header, never decoded
    # Raised limit: the same file now gets as far as decoding, which fails on no data.
    monkeypatch.setenv(images_mod.ENV_MAX_PIXELS, str(100_000_000))
    err = run.fails(_load_and_save("bomb.png"), "node 1 (LoadImage) failed", "bomb.png",
                    "could not be read")


def test_pixel_limit_option_and_edit_nodes(run, sd_models):
    photo(run.input, size=(40, 40))
    run.fails(_load_and_save(), "node 1 (LoadImage) failed", "40x40",
              extra=("--max-image-pixels", "1000"))
    # An image from elsewhere (here a node) is checked by the edit nodes too.
    images_mod.set_max_pixels(1000)
    wf = {"1": n("BadImage", kind="ok", size=64), "2": SD,
          "3": n("XMGIEVAEEncode", sd_model=["2", 0], image=["1", 0]),
          "4": n("Show", value=["3", 0])}
    run.fails(wf, "node 3 (XMGIEVAEEncode) failed", "64x64", "megapixels")


def test_truncated_png_names_the_file(run):
    good = photo(run.input, "whole.png", (64, 64))
    (run.input / "cut.png").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    run.fails(_load_and_save("cut.png"), "node 1 (LoadImage) failed", "cut.png",
              "could not be read")
    header_only_png(run.input / "empty.png", 64, 64)
    run.fails(_load_and_save("empty.png"), "node 1 (LoadImage) failed", "empty.png")


def test_gif_frames_load_as_a_batch_and_single_image_nodes_refuse_it(run, sd_models):
    frames = [Image.new("RGB", (128, 128), c) for c in ("red", "blue")]
    frames[0].save(run.input / "two.gif", save_all=True, append_images=frames[1:])
    code, err = run(_load_and_save("two.gif"))           # as ComfyUI: one image per frame
    assert code == 0, err
    assert len(run.written()) == 2
    shutil.rmtree(run.output)
    wf = {"1": n("LoadImage", image="two.gif"), "2": SD,
          "3": n("XMGIEInvert", sd_model=["2", 0], image=["1", 0], source_prompt="a cat",
                 method="direct", steps=2, guidance=7.5, inner_steps=1),
          "4": n("Show", value=["3", 0])}
    run.fails(wf, "node 3 (XMGIEInvert) failed", "batch of 2 images", "Image From Batch")


def test_one_pixel_image_error_suggests_a_real_size(run, sd_models):
    photo(run.input, "dot.png", (1, 1))
    err = run.fails(vae_roundtrip(SD, "dot.png"), "node 3 (XMGIEVAEEncode) failed", "1x1",
                    "512x512")
    assert "0x0" not in err


@pytest.mark.parametrize("name", ["../outside.png", "{outside}", "sub/../../outside.png"])
def test_load_image_refuses_paths_outside_the_input_folders(run, tmp_path, name):
    outside = photo(tmp_path / "elsewhere", "outside.png")
    shutil.copy(outside, tmp_path / "outside.png")
    (run.input / "sub").mkdir()
    name = name.format(outside=outside)
    run.fails(_load_and_save(name), "LoadImage", "outside the input folders", "--input-dir")
    # --input-dir widens the allowed folders.
    if name == str(outside):
        code, err = run(_load_and_save(name), "--input-dir", str(outside.parent))
        assert code == 0, err


def test_load_image_annotated_names_follow_comfyui(run):
    photo(run.output, "earlier.png")
    code, err = run(_load_and_save("earlier.png [output]"))
    assert code == 0, err


# --- prompts, instructions -----------------------------------------------------------------

def test_prompt_past_77_tokens_logs_the_dropped_words(run, sd_models, caplog):
    prompt = "a cat " * 60 + "wearing a zebra hat"
    wf = {"2": IP2P, "3": n("XMGIEEncodeInstruction", sd_model=["2", 0], instruction=prompt),
          "4": n("Show", value=["3", 0])}
    with caplog.at_level("WARNING"):
        code, err = run(wf)
    assert code == 0, err
    text = caplog.text
    assert "dropped" in text and "zebra hat" in text


def test_mgie_instruction_with_the_image_placeholder_blames_the_input(run, models):
    models.copy("mgie")
    photo(run.input)
    wf, _ = loader_workflow("mgie")
    wf["3"]["inputs"]["instruction"] = "make it <im_patch> snowy"
    err = run.fails(wf, "node 3 (XMGIEMGIEInstruction) failed", "instruction", "<im_patch>")
    assert "could not be loaded" not in err


def test_mgie_instruction_past_the_context_is_refused(run, models):
    models.copy("mgie")
    photo(run.input)
    wf, _ = loader_workflow("mgie")
    wf["3"]["inputs"]["instruction"] = "make it snowy and bright " * 200
    run.fails(wf, "node 3 (XMGIEMGIEInstruction) failed", "instruction", "context of 512")


# --- workflows -------------------------------------------------------------------------------

def test_deeply_nested_json_is_a_clear_error(run, tmp_path):
    for depth in (5000, 150):
        wf = {"1": n("Pass", x=0), "2": n("Show", value=["1", 0]),
              "3": {"class_type": "Show", "inputs": {}, "deep": None}}
        path = tmp_path / "wf" / "workflow.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(wf).replace('"deep": null', '"deep": ' + "[" * depth
                                               + "]" * depth))
        code = cli.main(["run", str(path), "--output-dir", str(run.output)])
        err = run.capsys.readouterr().err
        assert code == cli.EXIT_USAGE, err
        assert "nests JSON" in err and "RecursionError" not in err


def test_long_chain_is_checked_and_a_long_cycle_reported(run):
    size = 3000
    wf = {"1": n("Pass", x=1)}
    for i in range(2, size + 1):
        wf[str(i)] = n("Pass", x=[str(i - 1), 0])
    wf[str(size + 1)] = n("Show", value=[str(size), 0])
    code, err = run(wf)
    assert code == 0, err
    assert SHOWN == [1]
    wf["1"]["inputs"]["x"] = [str(size), 0]   # close the chain into a cycle
    err = run.fails(wf, "cycle", "expected a graph without cycles")
    assert len(err) < 2000


def test_long_reroute_chain_in_ui_format(run):
    count = 3000
    nodes = [{"id": 1, "type": "Pass", "mode": 0, "widgets_values": [7],
              "inputs": [], "outputs": [{"type": "INT", "links": [1]}]}]
    links = []
    for i in range(2, count + 2):
        nodes.append({"id": i, "type": "Reroute", "mode": 0,
                      "inputs": [{"name": "", "type": "*", "link": i - 1}],
                      "outputs": [{"type": "*", "links": [i]}]})
        links.append([i - 1, i - 1, 0, i, 0, "*"])
    nodes.append({"id": count + 2, "type": "Show", "mode": 0, "widgets_values": [],
                  "inputs": [{"name": "value", "type": "*", "link": count + 1}], "outputs": []})
    links.append([count + 1, count + 1, 0, count + 2, 0, "*"])
    code, err = run({"nodes": nodes, "links": links})
    assert code == 0, err
    assert SHOWN == [7]


def test_duplicate_node_ids_in_ui_format_are_refused(run):
    nodes = [{"id": 1, "type": "Pass", "mode": 0, "widgets_values": [1], "inputs": [],
              "outputs": []},
             {"id": 1, "type": "Show", "mode": 0, "widgets_values": [], "inputs": [],
              "outputs": []}]
    run.fails({"nodes": nodes, "links": []}, "two nodes with id 1", code=cli.EXIT_USAGE)


def test_bad_set_is_a_usage_error(run):
    wf = {"1": n("Pass", x=1), "2": n("Show", value=["1", 0])}
    run.fails(wf, "there is no node 9", code=cli.EXIT_USAGE, extra=("--set", "9.x=1"))
    run.fails(wf, "expected NODE_ID.INPUT=VALUE", code=cli.EXIT_USAGE, extra=("--set", "x"))


# --- --tiny compares images as given; Ctrl-C ------------------------------------------------

YELLOW_TWIN = (Path(__file__).resolve().parent.parent / "workflows" / "api"
               / "edit_carpet_yellow_api.json")


@pytest.mark.parametrize("mask_size, shown", [((256, 256), "64x64"), ((510, 510), "128x128")])
def test_tiny_compares_the_mask_with_the_photo_as_given(run, tiny_env, mask_size, shown):
    # A 256 px mask for a 512 px photo (or one 2 px short) must be refused under --tiny
    # as without it, although --tiny loads images at 128 px.
    photo(run.input, "photo.png", (512, 512))
    Image.new("L", mask_size, 255).save(run.input / "mask.png")
    workflow = json.loads(YELLOW_TWIN.read_text())
    err = run.fails(workflow, "mask.png", f"{mask_size[0]}x{mask_size[1]}", "photo.png",
                    "512x512", shown,
                    extra=("--tiny", "--set", "1.image=photo.png", "--set", "2.image=mask.png",
                           "--set", "4.steps=2"))
    assert "error:" in err


def test_tiny_keeps_matching_images_matching(run, tiny_env):
    photo(run.input, "photo.png", (320, 320))
    Image.new("L", (320, 320), 255).save(run.input / "mask.png")
    workflow = json.loads(YELLOW_TWIN.read_text())
    code, err = run(workflow, "--tiny", "--set", "1.image=photo.png", "--set",
                    "2.image=mask.png", "--set", "4.steps=2")
    assert code == 0, err
    (saved,) = run.written()
    assert Image.open(saved).size == (128, 128)


# The folder holding the xmgie package the tests import (children import the same).
ROOT_PARENT = Path(sys.modules["xmgie"].__file__).parent.parent


def _xmgie(tmp_path, *args, prelude=""):
    """``python -m xmgie ARGS`` in a child process, after ``prelude`` (Python source run
    first in that process)."""
    import os
    import subprocess

    code = (prelude + "\nimport runpy, sys\nsys.argv = ['xmgie'] + " + repr(list(args))
            + "\nrunpy.run_module('xmgie', run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "XMGIE_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT_PARENT)] + [
               p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run_args(run, tmp_path):
    photo(run.input, "carpet.png", (128, 128))
    Image.new("L", (128, 128), 255).save(run.input / "carpet_mask.png")
    return ["run", str(YELLOW_TWIN), "--tiny", "--input-dir", str(run.input),
            "--output-dir", str(run.output), "--set", "4.steps=400"]


def test_ctrl_c_mid_run_exits_130_and_writes_nothing(run, tiny_env, tmp_path):
    import signal

    proc = _xmgie(tmp_path, *_run_args(run, tmp_path))
    lines = []
    for line in proc.stdout:      # wait until a node has run: the run is under way
        lines.append(line)
        if line.startswith("[3] XMGIELoadCheckpoint"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (lines, out, err)
    assert err.rstrip().endswith("Interrupted.") and "Traceback" not in err
    assert run.written() == []


def test_ctrl_c_while_starting_up_exits_130(run, tiny_env, tmp_path):
    # Ctrl-C while torch is still being imported (the first seconds of every command):
    # the signal is sent from an import hook at the moment torch is first imported.
    prelude = ("import os, signal, sys\n"
               "class Hook:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch':\n"
               "            sys.meta_path.remove(self)\n"
               "            os.kill(os.getpid(), signal.SIGINT)\n"
               "        return None\n"
               "sys.meta_path.insert(0, Hook())\n")
    proc = _xmgie(tmp_path, *_run_args(run, tmp_path), prelude=prelude)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.rstrip().endswith("Interrupted.") and "Traceback" not in err
    assert run.written() == []


def test_ctrl_c_after_the_run_has_finished_does_not_kill_it(run, tiny_env, tmp_path):
    # A Ctrl-C while Python shuts down (after "Wrote ...") leaves the status of the run.
    prelude = ("import atexit, os, signal\n"
               "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n")
    args = _run_args(run, tmp_path)
    args[-1] = "4.steps=2"
    proc = _xmgie(tmp_path, *args, prelude=prelude)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert len(run.written()) == 1
