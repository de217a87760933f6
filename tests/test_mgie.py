"""MGIE's multimodal LLM on current transformers: the tiny model in the real layout (with
mllm.pt's official key names) loads through the public loader; generation settings; the
visual tokens, edit head and null condition; clear load errors; the nodes."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model")


@pytest.fixture(scope="module")
def lib():
    from xmgie.mgie_core.models import mgie

    return mgie


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A models folder with the tiny MGIE at <root>/mgie/tiny-mgie (the family's tiny path)."""
    from xmgie.mgie_core.tiny.mgie import make_mgie

    root = tmp_path_factory.mktemp("mgie-models")
    make_mgie(root / "mgie" / "tiny-mgie")
    return root


@pytest.fixture(scope="module")
def folder(root):
    return root / "mgie" / "tiny-mgie"


@pytest.fixture(scope="module")
def model(folder, lib):
    return lib.load_mgie(str(folder), device="cpu")


def _image(seed=0, h=40, w=56):
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def _copy(folder, tmp_path):
    dst = tmp_path / "mgie" / folder.name
    shutil.copytree(folder, dst)
    return dst


# --- layout and loading -------------------------------------------------------------------

def test_tiny_layout_has_official_key_names(folder):
    import json

    sd = torch.load(folder / "mllm.pt", weights_only=True)
    assert {"model.embed_tokens.weight", "lm_head.weight", "emb", "edit_head.query",
            "edit_head.llm2hid.weight", "edit_head.hid2feat.weight",
            "edit_head.mapper.encoder.layers.3.self_attn.in_proj_weight",
            "edit_head.mapper.decoder.layers.3.multihead_attn.in_proj_weight",
            "edit_head.mapper.encoder.norm.weight", "edit_head.mapper.decoder.norm.weight",
            } <= set(sd)
    assert all(k in ("emb", "model.embed_tokens.weight", "lm_head.weight")
               or k.startswith("edit_head.") for k in sd)
    assert sd["emb"].shape == (1, 8, 32) and sd["edit_head.query"].shape == (1, 77, 16)
    cfg = json.loads((folder / "LLaVA-7B-v1" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["mm_vision_tower"] == "tiny-clip-vit"
    assert cfg["mm_vision_select_layer"] == -2 and cfg["mm_use_im_start_end"]


def test_load_by_path_models_dir_and_tiny_mode(root, folder, lib, clean_paths):
    by_path = lib.load_mgie(str(folder), dtype="fp32", device="cpu")
    assert by_path.path == folder and by_path.dtype == torch.float32
    clean_paths.configure(models_dir=root)
    assert "tiny-mgie" in clean_paths.list_models(lib.family())
    assert lib.load_mgie("tiny-mgie", device="cpu").path == folder
    clean_paths.configure(reset=True, tiny_root=root)
    assert lib.load_mgie("mgie_7b", device="cpu").path == folder


def test_loaded_model_parts(model, lib):
    tok = model.tokenizer
    ids = model.img_ids
    assert ids == list(range(ids[0], ids[0] + 8))           # contiguous, after the image tokens
    assert all(len(tok.tokenize(t)) == 1 for t in lib.IMG_TOKENS)
    assert model.num_patches == 16 and model.select_layer == -2 and model.use_im_start_end
    assert model.llm.get_input_embeddings().weight.shape[0] == len(tok)
    sd = torch.load(model.path / "mllm.pt", weights_only=True)
    assert torch.equal(model.llm.get_input_embeddings().weight, sd["model.embed_tokens.weight"])
    assert torch.equal(model.llm.lm_head.weight, sd["lm_head.weight"])
    prompt = model.prompt("make it snow")
    assert prompt.startswith(lib.SYSTEM + " USER: what will this image be like if 'make it snow'\n"
                             "<im_start>" + "<im_patch>" * 16 + "<im_end>")
    assert prompt.endswith(" ASSISTANT:")


def test_img_tokens_added_when_the_llava_tokenizer_lacks_them(tmp_path, model, lib):
    from xmgie.mgie_core.tiny.mgie import make_mgie

    make_mgie(tmp_path / "tiny-mgie", img_tokens_in_tokenizer=False)
    other = lib.load_mgie(str(tmp_path / "tiny-mgie"), device="cpu")
    assert other.img_ids == model.img_ids and len(other.tokenizer) == len(model.tokenizer)


def test_edit_head_structure_matches_the_spec(model, lib):
    with torch.device("meta"):
        full = lib.EditHead()
    for head, d, llm, out in ((full, 512, 4096, 768), (model.edit_head, 16, 32, 32)):
        t = head.mapper
        assert isinstance(t, torch.nn.Transformer) and t.d_model == d and t.nhead == 4
        assert t.batch_first
        assert len(t.encoder.layers) == 4 and len(t.decoder.layers) == 4
        for layer in list(t.encoder.layers) + list(t.decoder.layers):
            assert layer.norm_first and layer.self_attn.num_heads == 4
            assert layer.self_attn.batch_first and layer.dropout.p == 0.0
            assert layer.dropout1.p == 0.0 and layer.dropout2.p == 0.0
        assert all(m.p == 0.0 for m in head.modules() if isinstance(m, torch.nn.Dropout))
        assert (head.llm2hid.in_features, head.llm2hid.out_features) == (llm, d)
        assert tuple(head.query.shape) == (1, 77, d)
        assert (head.hid2feat.in_features, head.hid2feat.out_features) == (d, out)
    assert full.mapper.encoder.layers[0].linear1.out_features == 2048


# --- instruction ----------------------------------------------------------------------------

def test_generation_is_greedy_no_repeat_3grams_and_bounded(model, lib, monkeypatch):
    import inspect

    assert inspect.signature(model.instruct).parameters["max_new_tokens"].default == 96
    seen = {}
    real = model.llm.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model.llm, "generate", spy)
    out = model.run(_image(), "make it look like winter", max_new_tokens=12)
    assert seen["do_sample"] is False and seen["num_beams"] == 1
    assert seen["no_repeat_ngram_size"] == 3 and seen["max_new_tokens"] == 12
    assert seen["inputs_embeds"].shape[:2] == seen["input_ids"].shape
    ids = out.generated_ids
    assert 0 < len(ids) <= 12
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    assert len(grams) == len(set(grams))


def test_instruct_returns_conditioning_and_independent_null(model, lib):
    from xmgie.mgie_core.models.conditioning import Conditioning

    text, cond = model.instruct(_image(), "make it look like winter", max_new_tokens=10)
    assert isinstance(cond, Conditioning) and cond.source == "mgie" and cond.text == text
    assert cond.cond.shape == (1, 77, 32) and cond.null.shape == (1, 77, 32)
    assert cond.cond.dtype == torch.float32 and cond.cond.device.type == "cpu"
    assert torch.isfinite(cond.cond).all() and not torch.allclose(cond.cond, cond.null)
    # The null condition, recomputed from mllm.pt with a plain EditHead.
    sd = torch.load(model.path / "mllm.pt", weights_only=True)
    head = lib.EditHead(llm_dim=32, d_model=16, out_dim=32, dim_feedforward=32).eval()
    head.load_state_dict({k[len("edit_head."):]: v for k, v in sd.items()
                          if k.startswith("edit_head.")})
    with torch.no_grad():
        null = head(torch.zeros(1, 8, 32), sd["emb"])
    torch.testing.assert_close(cond.null, null)


def test_instruct_is_deterministic(model):
    a = model.run(_image(1), "add a red hat", max_new_tokens=8)
    b = model.run(_image(1), "add a red hat", max_new_tokens=8)
    assert a.generated_ids == b.generated_ids and a.expressive == b.expressive
    assert torch.equal(a.conditioning.cond, b.conditioning.cond)
    c = model.run(_image(2), "add a red hat", max_new_tokens=8)
    assert not torch.equal(a.hidden, c.hidden)               # the image matters


def test_emitted_img_tokens_read_the_same_positions_as_the_fallback(model, lib, monkeypatch):
    """When the model emits [IMG0..7], the visual tokens are the hidden states predicting
    them; when it never does (the tiny model), they are appended: same positions."""
    text = model.tokenizer("a snowy street. white roofs. more", add_special_tokens=False)
    text = text["input_ids"]
    eos = model.tokenizer.eos_token_id

    def fake(ids):
        def generate(**kwargs):
            return torch.cat([kwargs["input_ids"], torch.tensor([ids])], 1)
        return generate

    monkeypatch.setattr(model.llm, "generate", fake(text + model.img_ids + [eos]))
    emitted = model.run(_image(), "make it winter", max_new_tokens=40)
    monkeypatch.setattr(model.llm, "generate", fake(text + [eos]))
    fallback = model.run(_image(), "make it winter", max_new_tokens=40)
    assert not emitted.fallback and fallback.fallback
    assert emitted.answer == fallback.answer == "a snowy street. white roofs. more"
    assert emitted.expressive == "a snowy street. white roofs."
    torch.testing.assert_close(emitted.hidden, fallback.hidden)
    torch.testing.assert_close(emitted.conditioning.cond, fallback.conditioning.cond)
    # Independently: last-layer hidden states at the positions before [IMG0..7].
    prompt = model.tokenizer(model.prompt("make it winter"), return_tensors="pt")["input_ids"]
    full = torch.cat([prompt, torch.tensor([text + model.img_ids])], 1)
    with torch.no_grad():
        feats = model.image_features(_image())
        embeds = model.llm.get_input_embeddings()(full)
        embeds[0, full[0] == model.token_id(lib.IM_PATCH)] = feats[0]
        hs = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    start = prompt.shape[1] + len(text)
    torch.testing.assert_close(emitted.hidden, hs[:, start - 1:start + 7])


def test_instruct_rejects_bad_input(model):
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError, match="instruction"):
        model.instruct(_image(), "  ")
    with pytest.raises(InputError, match="batch"):
        model.instruct(torch.rand(2, 8, 8, 3), "x")
    with pytest.raises(InputError, match="max_new_tokens"):
        model.instruct(_image(), "x", max_new_tokens=0)


def test_first_sentences(lib):
    assert lib.first_sentences("Snow on roofs. Cold light. Trees bare.") == \
        "Snow on roofs. Cold light."
    assert lib.first_sentences("one sentence") == "one sentence."
    assert lib.first_sentences("A. Alternatively, b.") == "A."
    assert lib.first_sentences("") == ""


# --- load errors ------------------------------------------------------------------------

def test_missing_mllm_key_is_listed(folder, tmp_path, lib):
    from xmgie.mgie_core.errors import ModelLoadError

    dst = _copy(folder, tmp_path)
    sd = torch.load(dst / "mllm.pt", weights_only=True)
    del sd["edit_head.hid2feat.bias"]
    torch.save(sd, dst / "mllm.pt")
    with pytest.raises(ModelLoadError, match=re.escape("edit_head.hid2feat.bias")):
        lib.load_mgie(str(dst), device="cpu")
    del sd["emb"]
    sd["edit_head.extra.weight"] = torch.zeros(1)
    torch.save(sd, dst / "mllm.pt")
    with pytest.raises(ModelLoadError, match="emb"):
        lib.load_mgie(str(dst), device="cpu")


def test_unexpected_mllm_key_is_listed(folder, tmp_path, lib):
    from xmgie.mgie_core.errors import ModelLoadError

    dst = _copy(folder, tmp_path)
    sd = torch.load(dst / "mllm.pt", weights_only=True)
    sd["model.not_a_weight"] = torch.zeros(3)
    torch.save(sd, dst / "mllm.pt")
    with pytest.raises(ModelLoadError, match="unexpected.*model.not_a_weight"):
        lib.load_mgie(str(dst), device="cpu")


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)])
def test_empty_tokenizer_folder_is_rejected(folder, tmp_path, lib, keep):
    from xmgie.mgie_core.errors import ModelLoadError

    dst = _copy(folder, tmp_path)
    for name in TOKENIZER_FILES:
        if name not in keep:
            (dst / "LLaVA-7B-v1" / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        lib.load_mgie(str(dst), device="cpu")


def test_missing_parts_are_load_errors(folder, tmp_path, lib):
    from xmgie.mgie_core.errors import ModelLoadError, ModelNotFoundError

    dst = _copy(folder, tmp_path)
    shutil.rmtree(dst / "tiny-clip-vit")
    with pytest.raises(ModelLoadError, match="vision tower 'tiny-clip-vit'"):
        lib.load_mgie(str(dst), device="cpu")
    shutil.rmtree(dst / "LLaVA-7B-v1")
    with pytest.raises(ModelLoadError, match="LLaVA-7B v1 folder"):
        lib.load_mgie(str(dst), device="cpu")
    with pytest.raises(ModelNotFoundError, match="mgie"):
        lib.load_mgie(str(tmp_path / "nowhere"), device="cpu")


# --- nodes ------------------------------------------------------------------------------

def test_nodes(root, clean_paths):
    from xmgie.nodes import mgie as nodes

    assert [c.NODE_ID for c in nodes.NODES] == ["XMGIELoadMGIE", "XMGIEMGIEInstruction"]
    for cls in nodes.NODES:
        assert re.fullmatch(r"XMGIE[A-Z][A-Za-z0-9]+", cls.NODE_ID) and cls.DISPLAY_NAME
        assert len(cls.DESCRIPTION) > 20 and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        for section in cls.INPUT_TYPES().values():
            for name, entry in section.items():
                assert entry[1].get("tooltip"), f"{cls.NODE_ID}.{name}"
    assert nodes.LoadMGIE.CATEGORY == "xmgie/loaders"
    assert nodes.MGIEInstruction.CATEGORY == "xmgie/instruction"
    assert nodes.MGIEInstruction.RETURN_TYPES == ("XMGIE_CONDITIONING", "STRING")

    clean_paths.configure(tiny_root=root)
    (model,) = nodes.LoadMGIE().load(model="mgie_7b", dtype="fp32")
    cond, text = nodes.MGIEInstruction().instruct(model, _image()[None], "make it winter", 6)
    assert cond.cond.shape == (1, 77, 32) and isinstance(text, str)


def test_image_placeholders_in_the_answer_are_dropped(model, lib, monkeypatch):
    """A random (or broken) model may write <im_patch>/<im_start>/<im_end> itself: they
    are not text, and one more <im_patch> would not fit the image features spliced at
    every placeholder of the teacher-forced pass. The run drops them."""
    text = model.tokenizer("a snowy street.", add_special_tokens=False)["input_ids"]
    eos = model.tokenizer.eos_token_id
    junk = [model.token_id(t) for t in (lib.IM_PATCH, lib.IM_START, lib.IM_END)]

    def generate(**kwargs):
        ids = text[:1] + junk + text[1:] + [eos]
        return torch.cat([kwargs["input_ids"], torch.tensor([ids])], 1)

    monkeypatch.setattr(model.llm, "generate", generate)
    out = model.run(_image(), "make it winter", max_new_tokens=40)
    assert out.answer == "a snowy street."
    monkeypatch.setattr(model.llm, "generate", lambda **kw: torch.cat(
        [kw["input_ids"], torch.tensor([text + junk + model.img_ids + [eos]])], 1))
    assert not model.run(_image(), "make it winter", max_new_tokens=40).fallback
