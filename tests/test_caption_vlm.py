"""BLIP-2 captioner and image-text-to-text VLM: loading the tiny models in their real
Hugging Face layouts, rejecting incomplete folders, captioning, asking, and the nodes."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

# Every file a tokenizer may be stored in (transformers 5 writes the first two).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model")
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")


@pytest.fixture(scope="module")
def cap_lib():
    from xmgie.mgie_core.models import captioner

    return captioner


@pytest.fixture(scope="module")
def vlm_lib():
    from xmgie.mgie_core.models import vlm

    return vlm


@pytest.fixture(scope="module")
def tiny_blip2(tiny_models, cap_lib):
    return cap_lib.load_blip2(str(tiny_models("blip2")), device="cpu")


@pytest.fixture(scope="module")
def tiny_vlm(tiny_models, vlm_lib):
    return vlm_lib.load_vlm(str(tiny_models("vlm")), device="cpu")


def _images(b=2, h=24, w=40, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _copy(src, tmp_path, remove=(), replace=None):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for name in remove:
        (dst / name).unlink(missing_ok=True)
    for name, text in (replace or {}).items():
        (dst / name).write_text(text)
    return dst


# --- the tiny models are real layouts ----------------------------------------------------

def test_tiny_blip2_layout(tiny_models):
    from transformers import Blip2Config

    path = tiny_models("blip2")
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "processor_config.json"):
        assert (path / f).exists(), f
    cfg = Blip2Config.from_pretrained(path, local_files_only=True)
    assert cfg.model_type == "blip-2" and cfg.text_config.model_type == "opt"
    assert cfg.num_query_tokens == 4 and cfg.image_token_index is not None


def test_tiny_vlm_layout(tiny_models):
    from transformers import AutoConfig

    path = tiny_models("vlm")
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / f).exists(), f
    assert AutoConfig.from_pretrained(path, local_files_only=True).model_type == "llava"


# --- BLIP-2 loading ----------------------------------------------------------------------

def test_blip2_load_by_name_from_models_dir(tiny_models, clean_paths, cap_lib):
    path = tiny_models("blip2")
    clean_paths.configure(models_dir=path.parent.parent)  # the tiny root is a models dir
    cap = cap_lib.load_blip2(path.name, device="cpu")
    assert isinstance(cap, cap_lib.Captioner)
    assert cap.path == path and cap.dtype == torch.float32 and cap.device.type == "cpu"
    assert type(cap.model).__name__ == "Blip2ForConditionalGeneration"
    assert type(cap.processor).__name__ == "Blip2Processor"
    assert cap.processor.num_query_tokens == cap.model.config.num_query_tokens
    assert len(cap.processor.tokenizer) >= 1000
    assert not any(p.requires_grad for p in cap.model.parameters())


def test_blip2_load_by_explicit_path_and_tiny_mode(tiny_models, clean_paths, cap_lib):
    path = tiny_models("blip2")
    assert cap_lib.load_blip2(str(path), device="cpu").path == path
    clean_paths.configure(tiny_root=path.parent.parent)
    assert cap_lib.load_blip2("blip2-opt-2.7b", device="cpu").path == path


def test_blip2_dtype_is_a_parameter(tiny_models, cap_lib):
    cap = cap_lib.load_blip2(str(tiny_models("blip2")), dtype="bf16", device="cpu")
    assert cap.dtype == torch.bfloat16
    assert cap.model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_blip2_missing_model_names_folders_and_source(tmp_path, clean_paths, cap_lib):
    from xmgie.mgie_core.errors import ModelNotFoundError

    clean_paths.configure(models_dir=tmp_path)
    with pytest.raises(ModelNotFoundError) as e:
        cap_lib.load_blip2("no-such-blip2")
    msg = str(e.value)
    assert str(tmp_path / "blip2" / "no-such-blip2") in msg
    assert "huggingface.co/Salesforce/blip2-opt-2.7b" in msg


def test_blip2_rejects_another_model_type(tiny_models, cap_lib):
    from xmgie.mgie_core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not 'blip-2'"):
        cap_lib.load_blip2(str(tiny_models("vlm")), device="cpu")


# --- incomplete folders are failed loads, never stub tokenizers ---------------------------

BROKEN_TOKENIZERS = {
    "no tokenizer files": dict(remove=TOKENIZER_FILES),
    "no vocabulary": dict(remove=VOCAB_FILES),
    "no tokenizer_config": dict(remove=("tokenizer_config.json",)),
    "empty tokenizer.json": dict(replace={"tokenizer.json": ""}),
    "tokenizer.json without a model": dict(replace={"tokenizer.json": "{}"}),
}


@pytest.mark.parametrize("family", ["blip2", "vlm"])
@pytest.mark.parametrize("case", list(BROKEN_TOKENIZERS))
def test_incomplete_tokenizer_is_rejected(family, case, tiny_models, tmp_path, cap_lib, vlm_lib):
    from xmgie.mgie_core.errors import ModelLoadError

    broken = _copy(tiny_models(family), tmp_path, **BROKEN_TOKENIZERS[case])
    load = cap_lib.load_blip2 if family == "blip2" else vlm_lib.load_vlm
    with pytest.raises(ModelLoadError) as e:
        load(str(broken), device="cpu")
    assert str(broken) in str(e.value)
    assert "tokenizer" in str(e.value)


@pytest.mark.parametrize("family", ["blip2", "vlm"])
def test_missing_weights_or_image_processor_is_a_load_error(family, tiny_models, tmp_path,
                                                            cap_lib, vlm_lib):
    from xmgie.mgie_core.errors import ModelLoadError

    load = cap_lib.load_blip2 if family == "blip2" else vlm_lib.load_vlm
    no_weights = _copy(tiny_models(family), tmp_path / "w", remove=("model.safetensors",))
    with pytest.raises(ModelLoadError, match="weights"):
        load(str(no_weights), device="cpu")
    no_proc = _copy(tiny_models(family), tmp_path / "p", remove=("processor_config.json",))
    with pytest.raises(ModelLoadError, match="processor"):
        load(str(no_proc), device="cpu")


# --- captioning -------------------------------------------------------------------------

def test_caption_one_string_per_image_deterministic(tiny_blip2, cap_lib):
    images = _images(3)
    first = cap_lib.caption(tiny_blip2, images, max_new_tokens=8)
    assert isinstance(first, list) and len(first) == 3
    assert all(isinstance(c, str) and c == c.strip() for c in first)
    assert cap_lib.caption(tiny_blip2, images, max_new_tokens=8) == first


def test_caption_prompt_and_beams(tiny_blip2, cap_lib):
    images = _images(1, 32, 32, seed=1)
    out = cap_lib.caption(tiny_blip2, images, prompt="a photo of", max_new_tokens=6, num_beams=2)
    assert len(out) == 1 and isinstance(out[0], str)
    assert not out[0].startswith("a photo of")  # only the model's own text comes back
    # A single image [H,W,3] is accepted as a batch of one.
    assert len(cap_lib.caption(tiny_blip2, images[0], max_new_tokens=4)) == 1


def test_caption_rejects_bad_input(tiny_blip2, cap_lib):
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError, match="images"):
        cap_lib.caption(tiny_blip2, torch.rand(1, 16, 16, 4))
    with pytest.raises(InputError, match="max_new_tokens"):
        cap_lib.caption(tiny_blip2, _images(1), max_new_tokens=0)


def test_caption_reports_progress_per_image(tiny_blip2, cap_lib):
    from xmgie.mgie_core import host

    updates = []

    class Bar:
        def __init__(self, total, desc):
            updates.append(("total", total))

        def update(self, n=1):
            updates.append(n)

        def close(self):
            pass

    previous = host.set_hooks(progress=Bar)
    try:
        cap_lib.caption(tiny_blip2, _images(2), max_new_tokens=3)
    finally:
        host.set_hooks(**vars(previous))
    assert updates == [("total", 2), 1, 1]


# --- VLM --------------------------------------------------------------------------------

def test_vlm_load_by_name_and_path(tiny_models, clean_paths, vlm_lib):
    path = tiny_models("vlm")
    clean_paths.configure(models_dir=path.parent.parent)
    vlm = vlm_lib.load_vlm(path.name, device="cpu")
    assert isinstance(vlm, vlm_lib.VLM) and vlm.path == path and vlm.model_type == "llava"
    assert vlm.processor.chat_template
    assert vlm_lib.load_vlm(str(path), device="cpu").path == path


def test_vlm_without_chat_template_is_rejected(tiny_models, tmp_path, vlm_lib):
    from xmgie.mgie_core.errors import ModelLoadError

    broken = _copy(tiny_models("vlm"), tmp_path, remove=("chat_template.jinja",
                                                          "chat_template.json"))
    with pytest.raises(ModelLoadError, match="chat template") as e:
        vlm_lib.load_vlm(str(broken), device="cpu")
    assert str(broken) in str(e.value)


def test_vlm_missing_model_names_folders_and_source(tmp_path, clean_paths, vlm_lib):
    from xmgie.mgie_core.errors import ModelNotFoundError

    clean_paths.configure(models_dir=tmp_path)
    with pytest.raises(ModelNotFoundError) as e:
        vlm_lib.load_vlm("no-such-vlm")
    msg = str(e.value)
    assert str(tmp_path / "vlm" / "no-such-vlm") in msg
    assert "huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct" in msg


def test_ask_returns_new_text_deterministically(tiny_vlm, vlm_lib):
    image = _images(1, 30, 44)[0]
    first = vlm_lib.ask(tiny_vlm, image, "What is in this image?", max_new_tokens=12)
    assert isinstance(first, str) and first == first.strip()
    assert "ASSISTANT" not in first and "What is in this image" not in first
    assert vlm_lib.ask(tiny_vlm, image[None], "What is in this image?", max_new_tokens=12) == first


def test_ask_is_greedy_whatever_the_generation_config(tiny_vlm, vlm_lib):
    cfg = tiny_vlm.model.generation_config
    saved = (cfg.do_sample, cfg.temperature, cfg.top_p)
    image = _images(1, 32, 32, seed=3)[0]
    expected = vlm_lib.ask(tiny_vlm, image, "Describe it.", max_new_tokens=8)
    try:
        cfg.do_sample, cfg.temperature, cfg.top_p = True, 1.5, 0.9
        assert vlm_lib.ask(tiny_vlm, image, "Describe it.", max_new_tokens=8) == expected
    finally:
        cfg.do_sample, cfg.temperature, cfg.top_p = saved


def test_ask_rejects_bad_input(tiny_vlm, vlm_lib):
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError, match="question"):
        vlm_lib.ask(tiny_vlm, _images(1)[0], "  ")
    with pytest.raises(InputError, match="image"):
        vlm_lib.ask(tiny_vlm, _images(2), "What is it?")


def test_ask_stops_on_interrupt(tiny_vlm, vlm_lib):
    from xmgie.mgie_core import host

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) > 3:  # let the first checks (before generation) pass
            raise host.Interrupted()

    previous = host.set_hooks(check_interrupt=interrupt)
    try:
        with pytest.raises(host.Interrupted):
            vlm_lib.ask(tiny_vlm, _images(1)[0], "What is it?", max_new_tokens=50)
    finally:
        host.set_hooks(**vars(previous))
    assert len(calls) < 50


# --- nodes ------------------------------------------------------------------------------

def _node_modules():
    from xmgie.nodes import caption, vlm

    return [caption, vlm]


def test_node_metadata():
    ids = []
    for mod in _node_modules():
        for cls in mod.NODES:
            ids.append(cls.NODE_ID)
            assert re.fullmatch(r"XMGIE[A-Z][A-Za-z0-9]+", cls.NODE_ID)
            assert cls.CATEGORY.startswith("xmgie/") and cls.CATEGORY == cls.CATEGORY.lower()
            assert len(cls.DESCRIPTION) > 20 and cls.DISPLAY_NAME
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
            assert callable(getattr(cls(), cls.FUNCTION))
            for section in cls.INPUT_TYPES().values():
                for name, entry in section.items():
                    assert entry[1].get("tooltip"), f"{cls.NODE_ID}.{name}"
    assert ids == ["XMGIELoadBLIP2", "XMGIECaption", "XMGIELoadVLM", "XMGIEAskVLM"]


def test_nodes_run_on_tiny_models(tiny_models, clean_paths):
    from xmgie.nodes import caption, vlm
    from xmgie.nodes._common import CAPTIONER, VLM_MODEL

    clean_paths.configure(tiny_root=tiny_models("blip2").parent.parent)
    tiny_models("vlm")
    assert caption.LoadBLIP2.RETURN_TYPES == (CAPTIONER,)
    assert vlm.LoadVLM.RETURN_TYPES == (VLM_MODEL,)
    assert "blip2-opt-2.7b" in caption.LoadBLIP2.INPUT_TYPES()["required"]["model"][0]

    (cap,) = caption.LoadBLIP2().load(model="blip2-opt-2.7b", dtype="auto")
    images = _images(2)
    out = caption.Caption().caption(cap, images, max_new_tokens=5)
    (text,) = out["result"]
    assert out["ui"]["text"] == [text]
    assert isinstance(text, str) and len(text.split("\n")) == 2
    (text_p,) = caption.Caption().caption(cap, images, max_new_tokens=5,
                                          prompt="a photo of")["result"]
    assert isinstance(text_p, str)

    (model,) = vlm.LoadVLM().load(model="Qwen2.5-VL-3B-Instruct", dtype="fp32")
    (answer,) = vlm.AskVLM().ask(model, images[:1], "What is it?", max_new_tokens=6)
    assert isinstance(answer, str) and "\n" not in answer
    (answers,) = vlm.AskVLM().ask(model, images, "What is it?", max_new_tokens=6)
    assert answers.split("\n")[0] == answer
