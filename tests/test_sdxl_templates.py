"""The SDXL templates (workflows/edit_sdxl.json: core Load Checkpoint on an SDXL file
through the bridge; workflows/edit_sdxl_guided.json: the pack's own loader, null-text and
four chained controls) run as a user runs them, under ``xmgie run --tiny``, on the tiny
SDXL single file in ComfyUI's layout that tiny mode gives for an SDXL checkpoint name; and
the bridge from the runner's Load Checkpoint edits exactly as the pack's own loader does.
The in-ComfyUI check is at the end (skipped unless ``XMGIE_COMFYUI_DIR`` names a ComfyUI
checkout)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_shipped_workflows import UPDATES, _overrides, _prompt

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {"edit_sdxl": ROOT / "workflows" / "edit_sdxl.json",
             "edit_sdxl_guided": ROOT / "workflows" / "edit_sdxl_guided.json"}
SDXL_NAME = "sd_xl_base_1.0.safetensors"


def test_templates_name_an_sdxl_checkpoint_that_tiny_mode_maps_to_the_tiny_sdxl():
    from xmgie.mgie_core import paths

    for name, wf in TEMPLATES.items():
        prompt = _prompt(wf)
        loaders = [n for n in prompt.values()
                   if n["class_type"] in ("CheckpointLoaderSimple", "XMGIELoadCheckpoint")]
        assert [n["inputs"]["ckpt_name"] for n in loaders] == [SDXL_NAME], name
    assert paths.tiny_family(paths.SD_CHECKPOINT, SDXL_NAME) is paths.SDXL_CHECKPOINT
    assert paths.tiny_family(paths.SD_CHECKPOINT, "juggernautXL_v9.safetensors") \
        is paths.SDXL_CHECKPOINT
    assert paths.tiny_family(paths.SD_CHECKPOINT, "v1-5-pruned-emaonly.safetensors") \
        is paths.SD_CHECKPOINT
    assert SDXL_NAME in paths.SDXL_CHECKPOINT.default_names
    # folders too: the InstructPix2Pix and diffusers loaders read SDXL and SD 2.x folders
    assert paths.tiny_family(paths.IP2P_DIFFUSERS, "sdxl-instructpix2pix-768") \
        is paths.SDXL_IP2P_DIFFUSERS
    assert paths.tiny_family(paths.IP2P_DIFFUSERS, "instruct-pix2pix") is paths.IP2P_DIFFUSERS
    assert paths.tiny_family(paths.SD_DIFFUSERS, "stable-diffusion-2-1") is paths.SD2_DIFFUSERS
    assert paths.tiny_family(paths.SD_DIFFUSERS, "stable-diffusion-xl-base-1.0") \
        is paths.SDXL_DIFFUSERS
    # the bridge template starts from core Load Checkpoint and goes through the bridge
    bridge = _prompt(TEMPLATES["edit_sdxl"])
    assert {n["class_type"] for n in bridge.values()} >= {"CheckpointLoaderSimple",
                                                           "XMGIESDModelFromComfy", "VAEDecode"}


SD2_NAME = "v2-1_768-ema-pruned.safetensors"
RUNS = [("edit_sdxl", None, "tiny-sdxl.safetensors"),
        ("edit_sdxl_guided", None, "tiny-sdxl.safetensors"),
        # the same graphs on an SD 2.x 768-v file (v-prediction, OpenCLIP-H)
        ("edit_sdxl", SD2_NAME, "tiny-sd2.safetensors"),
        ("edit_sdxl_guided", SD2_NAME, "tiny-sd2.safetensors")]


@pytest.mark.parametrize("name,ckpt,tiny_file", RUNS,
                         ids=[f"{n}-{'sd2' if c else 'sdxl'}" for n, c, _ in RUNS])
def test_template_runs_under_tiny(name, ckpt, tiny_file, tmp_path, tiny_env, capsys,
                                  monkeypatch):
    """`xmgie run --tiny` as a user types it: the run loads the tiny single file of the
    family the checkpoint name says (and no other), saves 128 px images, and every
    optimising control applies updates."""
    from xmgie import cli
    from xmgie.mgie_core import paths

    wf = TEMPLATES[name]
    resolved: list[Path] = []
    real_resolve = paths.resolve

    def recording(family, model_name):
        path = real_resolve(family, model_name)
        resolved.append(Path(path))
        return path

    monkeypatch.setattr(paths, "resolve", recording)
    prompt = _prompt(wf)
    (loader,) = [nid for nid, n in prompt.items() if "ckpt_name" in n["inputs"]]
    other = ["--set", f"{loader}.ckpt_name={json.dumps(ckpt)}"] if ckpt else []
    assert cli.main(["check", str(wf), "--tiny", *other]) == 0
    out_dir = tmp_path / "out"
    rc = cli.main(["run", str(wf), "--tiny", "--output-dir", str(out_dir),
                   *_overrides(prompt), *other])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    checkpoints = [p.name for p in resolved if p.parent.name == "checkpoints"]
    assert checkpoints and set(checkpoints) == {tiny_file}, resolved
    pngs = list(out_dir.rglob("*.png"))
    assert pngs, printed.out
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (128, 128)
    applied: dict[str, list[int]] = {}
    for stage, n, _ in UPDATES.findall(printed.out):
        applied.setdefault(stage.strip(), []).append(int(n))
    if name == "edit_sdxl_guided":
        for stage in ("null-text inversion", "MAG", "A-STAR", "identity guidance"):
            assert stage in applied and min(applied[stage]) > 0, (stage, printed.out)


# --- the bridge from the runner's Load Checkpoint ------------------------------------------

@pytest.fixture
def sdxl_run(tiny_root, tiny_models, clean_paths, tmp_path):
    """The runner's context with the template's photo and mask at 128 px, the tiny SDXL
    single file, and the text encoders in fp32 (``--fp32-text-enc``, as the pack's own
    loader has them)."""
    from xmgie.runner import core_nodes

    tiny_models("sdxl_checkpoint")
    clean_paths.configure(tiny_root=tiny_root)
    for name in ("carpet.png", "carpet_mask.png"):
        with Image.open(ROOT / "workflows" / "inputs" / name) as im:
            im.resize((128, 128), Image.NEAREST).save(tmp_path / name)
    with core_nodes.using_context(core_nodes.RunContext(
            input_dirs=[tmp_path], output_dir=tmp_path / "out")) as ctx:
        ctx.text_encoder_dtype = torch.float32
        yield ctx


def _run(prompt: dict):
    from xmgie import cli
    from xmgie.runner import engine

    registry = cli.build_registry()
    return engine.execute(engine.check(prompt, registry), registry)


def _api(name: str, steps: int = 3) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}_api.json").read_text())
    for node in prompt.values():
        for key in ("steps", "inner_steps", "iterations"):
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = min(node["inputs"][key], steps)
    return prompt


def test_bridge_from_the_runners_load_checkpoint_edits_as_the_packs_loader(sdxl_run):
    """edit_sdxl headless: Load Checkpoint (the tiny SDXL file's UNet, both text encoders
    and VAE) -> bridge -> invert -> CAM + PFB edit -> core VAE Decode gives an SDXL model
    and, bit for bit, what the pack's own loader and decoder give for the same edit."""
    bridged = _api("edit_sdxl")
    own = _api("edit_sdxl")
    own["3"] = {"class_type": "XMGIELoadCheckpoint",
                "inputs": {"ckpt_name": SDXL_NAME, "dtype": "auto"}}
    del own["4"]
    for node in own.values():
        for key, value in node["inputs"].items():
            if value == ["4", 0]:
                node["inputs"][key] = ["3", 0]
    for nid, latent in (("10", ["9", 0]), ("12", ["9", 1])):
        own[nid] = {"class_type": "XMGIEVAEDecode",
                    "inputs": {"sd_model": ["3", 0], "latent": latent}}
    a, b = _run(bridged), _run(own)
    (sd,) = a.outputs["4"]
    assert sd.family == "SDXL" and sd.text_encoder_2 is not None and sd.tokenizer_2 is not None
    assert b.outputs["3"][0].family == "SDXL"
    edited, reconstruction = a.outputs["9"][0]["samples"], a.outputs["9"][1]["samples"]
    assert edited.shape == (1, 4, 16, 16) and torch.isfinite(edited).all()
    assert not torch.equal(edited, reconstruction)              # the edit changed something
    for i in (0, 1):
        assert torch.equal(a.outputs["9"][i]["samples"], b.outputs["9"][i]["samples"])
    for nid in ("10", "12"):
        assert a.outputs[nid][0].shape == (1, 128, 128, 3)
        assert torch.equal(a.outputs[nid][0], b.outputs[nid][0])


def test_guided_template_through_the_bridge(sdxl_run):
    """edit_sdxl_guided's graph with the bridge from the runner's Load Checkpoint in place
    of the pack's loader: null-text and the four chained controls apply updates on the
    SDXL model the bridge builds."""
    prompt = _api("edit_sdxl_guided", steps=2)
    prompt["3"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_NAME}}
    prompt["20"] = {"class_type": "XMGIESDModelFromComfy",
                    "inputs": {"model": ["3", 0], "clip": ["3", 1], "vae": ["3", 2],
                               "dtype": "auto"}}
    for node in list(prompt.values()):
        for key, value in node["inputs"].items():
            if value == ["3", 0] and node["class_type"] != "XMGIESDModelFromComfy":
                node["inputs"][key] = ["20", 0]
    prompt["10"]["inputs"]["only_people"] = False
    res = _run(prompt)
    (sd,) = res.outputs["20"]
    assert sd.family == "SDXL"
    report = res.outputs["11"][2]
    for stage in ("MAG", "A-STAR", "identity guidance"):
        line = next(ln for ln in report.splitlines() if ln.startswith(stage + ":"))
        assert int(line.split(":")[1].split()[0]) > 0, report
    image = res.outputs["13"][0]
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()


# --- in a real ComfyUI server (skipped unless XMGIE_COMFYUI_DIR names a checkout) ----------

COMFY_DIR = os.environ.get("XMGIE_COMFYUI_DIR")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 10.0):
    """A JSON request to the local server. The tests are offline (conftest.py refuses
    every connection); this one call may reach 127.0.0.1, and nothing else."""
    import _socket
    import socket
    import urllib.request

    guarded = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family == socket.AF_INET and address[0] == "127.0.0.1":
            return _socket.socket.connect(sock, address)
        return guarded(sock, address)

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json"})
    socket.socket.connect = loopback_only
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    finally:
        socket.socket.connect = guarded


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory, tiny_models):
    """ComfyUI's own server (``main.py --cpu``) on a base directory of its own: the pack
    in custom_nodes/ (a link to this checkout), under models/checkpoints the random-weight
    SDXL file ComfyUI's detection takes as SDXL, named as the template names it, and the
    template's photo and mask (128 px, for speed) in input/."""
    import subprocess
    import time
    import urllib.error

    from xmgie.mgie_core.tiny.sdxl_checkpoint import make_comfy_sdxl_checkpoint

    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "xmgie").symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    make_comfy_sdxl_checkpoint(base / "models" / "checkpoints" / SDXL_NAME)
    # the guided template's identity encoder: the tiny CLIP vision folder under the name
    # the template gives
    (base / "models" / "clip_vision").mkdir()
    (base / "models" / "clip_vision" / "clip-vit-large-patch14").symlink_to(
        tiny_models("clip_vision"), target_is_directory=True)
    (base / "input").mkdir()
    for name in ("carpet.png", "carpet_mask.png"):
        with Image.open(ROOT / "workflows" / "inputs" / name) as im:
            im.resize((128, 128), Image.NEAREST).save(base / "input" / name)
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--base-directory", str(base), "--listen",
         "127.0.0.1", "--port", str(port), "--disable-auto-launch"],
        cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                _http(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-4000:])
        yield url, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _queue(url: str, base: Path, prompt: dict) -> dict:
    """POST the prompt, wait for its history entry; it must have succeeded."""
    import time

    queued = _http(url + "/prompt", {"prompt": prompt, "client_id": "xmgie-test"})
    pid = queued["prompt_id"]
    entry = None
    for _ in range(600):
        history = _http(url + f"/history/{pid}")
        if pid in history and history[pid].get("status", {}).get("completed") is not None:
            entry = history[pid]
            if entry["status"].get("status_str") in ("success", "error"):
                break
        time.sleep(0.5)
    log = (base / "server.log").read_text()
    assert entry is not None, "no result in time\n" + log[-4000:]
    assert entry["status"]["status_str"] == "success", (entry["status"], log[-4000:])
    return entry


def _saved_size(base: Path, entry: dict, node: str) -> tuple[int, int]:
    (saved,) = entry["outputs"][node]["images"]
    with Image.open(base / "output" / saved["subfolder"] / saved["filename"]) as im:
        return im.size


@pytest.mark.skipif(not COMFY_DIR, reason="set XMGIE_COMFYUI_DIR to a ComfyUI checkout")
def test_edit_sdxl_runs_in_a_real_comfyui_server(comfy_server):
    """The edit_sdxl template's prompt POSTed to ComfyUI's /prompt: core Load Checkpoint
    loads the SDXL file (ComfyUI's SDXL model, CLIP-L + bigG, SDXL VAE), the bridge
    hands them to the pack, which inverts and edits, and core VAE Decode and Save Image
    write the edit."""
    url, base = comfy_server
    prompt = _api("edit_sdxl", steps=2)
    assert prompt["3"]["class_type"] == "CheckpointLoaderSimple"
    entry = _queue(url, base, prompt)
    assert _saved_size(base, entry, "11") == (128, 128)
    log = (base / "server.log").read_text()
    assert "Requested to load SDXL" in log     # ComfyUI's own SDXL model ran the edit


@pytest.mark.skipif(not COMFY_DIR, reason="set XMGIE_COMFYUI_DIR to a ComfyUI checkout")
def test_edit_sdxl_guided_runs_in_a_real_comfyui_server(comfy_server):
    """The guided template in the same server: the pack's own loader reads the SDXL file
    from ComfyUI's checkpoints folder; null-text, then MAG, A-STAR and identity guidance
    apply updates (the report Preview Any shows), and the seam-blurred edit is saved."""
    url, base = comfy_server
    prompt = _api("edit_sdxl_guided", steps=2)
    prompt["10"]["inputs"]["only_people"] = False      # the photo is a carpet
    entry = _queue(url, base, prompt)
    assert _saved_size(base, entry, "15") == (128, 128)
    report = "\n".join(entry["outputs"]["16"]["text"])
    for stage in ("MAG", "A-STAR", "identity guidance"):
        line = next(ln for ln in report.splitlines() if ln.startswith(stage + ":"))
        assert int(line.split(":")[1].split()[0]) > 0, report
