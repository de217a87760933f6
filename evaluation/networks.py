"""The networks metrics need, found the pack's usual way and never downloaded.

Search order (``mgie_core.paths``): the name as a path; ``<models dir>/<folder>/<name>``
for every ``--models-dir`` / ``XMGIE_MODELS_DIR``; for folders, the local Hugging Face
cache; for files, torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision,
torchmetrics and torch-fidelity keep what they downloaded). A missing network raises
:class:`ModelNotFoundError` naming the file, the folders searched and where the file is
published. In tiny mode every family resolves to its random-weight tiny file
(:mod:`.tiny`).

=================  ===========================================  ======================
family             file                                         folder
=================  ===========================================  ======================
fid_inception      weights-inception-2015-12-05-6726825d.pth    metrics/
lpips_alex         alexnet-owt-7be5be79.pth                     metrics/
lpips_vgg          vgg16-397923af.pth                           metrics/
lpips_squeeze      squeezenet1_1-b8a52dc0.pth                   metrics/
clip_score         clip-vit-large-patch14 (whole CLIP folder)   clip_vision/
=================  ===========================================  ======================
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..mgie_core import host, paths
from ..mgie_core.errors import InputError, ModelLoadError, ModelNotFoundError
from ..mgie_core.models.validate import check_loading_info, weights_file

FID_INCEPTION = paths.register_family(paths.Family(
    key="fid_inception", what="Inception-v3 FID network (torch-fidelity weights)",
    folder="metrics", kind="file", extensions=(".pth",),
    default_names=("weights-inception-2015-12-05-6726825d.pth",),
    published="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
              "weights-inception-2015-12-05-6726825d.pth (the TensorFlow FID Inception "
              "ported by torch-fidelity; torchmetrics uses the same file)",
    tiny_name="tiny-inception-fid.pth"))

_TORCHVISION = "https://download.pytorch.org/models/"
LPIPS_FAMILIES = {
    net: paths.register_family(paths.Family(
        key=f"lpips_{net}", what=f"{label} weights for LPIPS (torchvision layout)",
        folder="metrics", kind="file", extensions=(".pth",), default_names=(file,),
        published=f"{_TORCHVISION}{file} (torchvision's ImageNet {label}; LPIPS's own "
                  "linear layers ship inside the lpips package)",
        tiny_name=f"tiny-{net}.pth"))
    for net, label, file in (("alex", "AlexNet", "alexnet-owt-7be5be79.pth"),
                             ("vgg", "VGG-16", "vgg16-397923af.pth"),
                             ("squeeze", "SqueezeNet 1.1", "squeezenet1_1-b8a52dc0.pth"))}

CLIP_SCORE = paths.register_family(paths.Family(
    key="clip_score", what="CLIP model with text and vision towers (Hugging Face folder)",
    folder="clip_vision", kind="folder", folder_marker="config.json",
    default_names=("clip-vit-large-patch14",), hf_repos=("openai/clip-vit-large-patch14",),
    published="https://huggingface.co/openai/clip-vit-large-patch14 (the whole repository; "
              "the same folder serves IPS)",
    tiny_name="tiny-clip-full"))

HUB_HINT = ("Put it in the '{folder}' folder of a models dir (--models-dir or "
            f"{paths.ENV_MODELS_DIR}) or in torch's hub cache {{hub}}. Nothing is downloaded.")


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find(family: paths.Family, name: str | None = None) -> Path:
    """Path of a metric network, or ModelNotFoundError (see the module docstring)."""
    name = name or family.default_names[0]
    try:
        return paths.resolve(family, name)
    except ModelNotFoundError as exc:
        if paths.tiny_root() is not None or family.kind != "file":
            raise
        hub = hub_checkpoints() / Path(name).name
        if hub.is_file():
            return hub
        raise ModelNotFoundError(family.what, name, exc.searched + [hub], family.published,
                                 hint=HUB_HINT.format(folder=family.folder, hub=hub.parent)
                                 ) from None


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else host.device()


@contextlib.contextmanager
def _weights_only_loads():
    """torch-fidelity loads its weights file with weights_only switched off; torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD makes that load refuse anything but tensors, as every
    load of this pack does."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


# --- Inception (FID, IS) ------------------------------------------------------------

FID_FEATURES = ("64", "192", "768", "2048")


class Inception(torch.nn.Module):
    """torch-fidelity's Inception-v3 (the TensorFlow FID network: its own bilinear resize
    to 299 px, as TF did), giving the FID features and the 1008 "unbiased" logits IS
    uses from one forward pass. Input: uint8 [B, 3, H, W]."""

    def __init__(self, net: torch.nn.Module, fid_feature: str, path: Path):
        super().__init__()
        self.net = net
        self.fid_feature = fid_feature
        self.path = path

    @torch.no_grad()
    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        feats, logits = self.net(images_u8.to(device))
        return feats.reshape(feats.shape[0], -1).double().cpu(), logits.double().cpu()


def load_inception(name: str | None = None, fid_feature: int | str = 2048,
                   device=None) -> Inception:
    """The FID/IS Inception from the model folders (see :func:`find`)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise ModelLoadError(FID_INCEPTION.what, "(torch-fidelity)", "torch-fidelity is not "
                             "installed", 'pip install "xmgie[eval]"') from exc
    feature = str(fid_feature)
    if feature not in FID_FEATURES:
        raise InputError("fid_feature", f"got {fid_feature!r}", f"one of {', '.join(FID_FEATURES)}")
    path = find(FID_INCEPTION, name)
    try:
        with _weights_only_loads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = FeatureExtractorInceptionV3("inception-v3-compat", [feature, "logits_unbiased"],
                                              feature_extractor_weights_path=str(path))
    except Exception as exc:  # pickled objects, wrong keys or shapes, a truncated file
        raise ModelLoadError(FID_INCEPTION.what, path, f"{type(exc).__name__}: {exc}",
                             "Use torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                             "(a state dict of tensors).") from exc
    return Inception(net.eval().requires_grad_(False).to(_device(device)), feature, path)


# --- LPIPS ----------------------------------------------------------------------------

def load_lpips(net: str = "alex", name: str | None = None, device=None):
    """LPIPS v0.1 (lpips package) with the torchvision backbone read from the model folders
    (only its ``features.*`` weights are used) and the linear layers the package ships.

    The lpips package would fetch the backbone through torchvision (a download); here it
    is built with random weights and then filled from the local file, keys mapped from
    torchvision's ``features.<i>.*`` to lpips's ``net.slice<k>.<i>.*``."""
    try:
        import lpips
    except ImportError as exc:
        raise ModelLoadError("LPIPS", "(lpips)", "the lpips package is not installed",
                             'pip install "xmgie[eval]"') from exc
    if net not in LPIPS_FAMILIES:
        raise InputError("lpips_net", f"got {net!r}", f"one of {', '.join(LPIPS_FAMILIES)}")
    family = LPIPS_FAMILIES[net]
    path = find(family, name)
    try:
        backbone = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(family.what, path, f"not a state dict of tensors ({exc})",
                             f"Use torchvision's {family.default_names[0]}.") from exc
    if isinstance(backbone, dict) and "state_dict" in backbone:
        backbone = backbone["state_dict"]
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    state = model.state_dict()
    wanted = {}
    for key in state:
        if key.startswith("net.slice"):
            _, _, rest = key.split(".", 2)          # net.slice1.0.weight -> 0.weight
            wanted[key] = f"features.{rest}"
    missing = [src for src in wanted.values() if src not in backbone]
    if missing:
        raise ModelLoadError(family.what, path, f"{len(missing)} backbone weights are missing "
                             f"(e.g. {', '.join(missing[:3])})",
                             f"Use torchvision's {family.default_names[0]}.")
    try:
        lins = torch.load(lin_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError("LPIPS linear layers", lin_path, str(exc),
                             "Reinstall the lpips package.") from exc
    partial = {}
    for key, src in wanted.items():
        if backbone[src].shape != state[key].shape:
            raise ModelLoadError(family.what, path,
                                 f"{src} has shape {tuple(backbone[src].shape)}, "
                                 f"expected {tuple(state[key].shape)}",
                                 f"Use torchvision's {family.default_names[0]}.")
        partial[key] = backbone[src]
    # lin<k> and lins.<k> are the same modules: load only the lin<k> names, as lpips does.
    partial.update(lins)
    result = model.load_state_dict(partial, strict=False)
    # Every lin<k> layer must come from the package's file (lins.<k> are the same modules).
    lin_missing = [k for k in result.missing_keys if re.match(r"lin\d+\.", k)]
    if result.unexpected_keys or lin_missing:
        raise ModelLoadError("LPIPS linear layers", lin_path, "unexpected keys "
                             f"{result.unexpected_keys[:3]}" if result.unexpected_keys else
                             f"missing keys {lin_missing[:3]}", "Reinstall the lpips package.")
    model.path = path
    return model.eval().requires_grad_(False).to(_device(device))


# --- CLIP score -----------------------------------------------------------------------

def load_clip(name: str | None = None, device=None):
    """(CLIPModel, CLIPProcessor) of a whole CLIP folder, offline."""
    from transformers import CLIPModel, CLIPProcessor

    folder = find(CLIP_SCORE, name)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(CLIP_SCORE.what, folder, f"unreadable config.json ({exc})") from exc
    if model_type != "clip":
        raise ModelLoadError(CLIP_SCORE.what, folder, f"config.json has model_type "
                             f"{model_type!r}; CLIP score needs a whole CLIP (model_type "
                             "'clip', text and vision towers)",
                             "Use the whole openai/clip-vit-large-patch14 repository.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = CLIPModel.from_pretrained(folder, local_files_only=True,
                                                    output_loading_info=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(CLIP_SCORE.what, folder, f"transformers could not load it "
                             f"({type(exc).__name__}: {exc})",
                             "The folder needs config.json, the weights, the tokenizer files "
                             "and preprocessor_config.json.") from exc
    # Every weight must be in the folder (a missing one would keep its random value).
    check_loading_info(info, CLIP_SCORE.what, weights_file(folder), ("*.position_ids",))
    model.path = folder
    return model.eval().requires_grad_(False).to(_device(device)), processor


# --- IPS --------------------------------------------------------------------------------

DEFAULT_IPS_ENCODER = "clip_vision:clip-vit-large-patch14"


def load_ips_encoder(spec: str | None = None, device=None):
    """The pack's identity encoder for IPS, from ``KIND:NAME`` (see
    ``mgie_core.models.identity``)."""
    from ..mgie_core.models import identity

    kind, _, name = (spec or DEFAULT_IPS_ENCODER).partition(":")
    if kind not in identity.KINDS or not name:
        raise InputError("ips_encoder", f"got {spec!r}",
                         f"KIND:NAME with KIND one of {', '.join(identity.KINDS)}",
                         "e.g. clip_vision:clip-vit-large-patch14 or "
                         "face_recognition:arcface_r100.pth")
    return identity.load_identity_encoder(kind, name, device=_device(device))
