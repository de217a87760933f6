"""Identity nodes: load a face-recognition or CLIP encoder, score identity preservation."""

from __future__ import annotations

import torch

from ..mgie_core import host, paths
from ..mgie_core.models import identity as id_lib
from ._common import IDENTITY_ENCODER, PREFIX, category, inp


def _model_names() -> list[str]:
    names: list[str] = []
    for fam in (paths.FACE_RECOGNITION, paths.CLIP_VISION):
        names += [n for n in paths.list_models(fam) if n not in names]
    return names


class LoadIdentityEncoder:
    NODE_ID = f"{PREFIX}LoadIdentityEncoder"
    DISPLAY_NAME = "xMGIE Load Identity Encoder"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads a frozen identity encoder: an ArcFace IResNet face-recognition "
                   "network (models/face_recognition) for people, or a CLIP vision encoder "
                   "folder (models/clip_vision) for objects.")
    RETURN_TYPES = (IDENTITY_ENCODER,)
    RETURN_NAMES = ("identity_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (list(id_lib.KINDS), inp(
                "face_recognition: ArcFace IResNet state dict, for faces. clip_vision: CLIP "
                "image embedding (Hugging Face folder), for objects.",
                default="face_recognition")),
            "model_name": (_model_names(), inp(
                "The encoder: a file in models/face_recognition for face_recognition, a "
                "folder in models/clip_vision for clip_vision.")),
        }}

    def load(self, kind, model_name):
        return (id_lib.load_identity_encoder(kind, model_name, device=host.device()),)


class IdentityScore:
    NODE_ID = f"{PREFIX}IdentityScore"
    DISPLAY_NAME = "xMGIE Identity Score"
    CATEGORY = category("identity")
    DESCRIPTION = ("Identity preservation score (IPS): cosine similarity of the identity "
                   "embeddings of the edited and the source images (1 = same identity). "
                   "With a mask, both images are first cropped to the mask's box.")
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("ips", "report")
    OUTPUT_NODE = True  # shows the score
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_encoder": (IDENTITY_ENCODER, inp(
                "An encoder from xMGIE Load Identity Encoder.")),
            "edited": ("IMAGE", inp("The edited image(s).")),
            "source": ("IMAGE", inp("The source image: one, or one per edited image.")),
        }, "optional": {
            "mask": ("MASK", inp("Optional region (e.g. the face) to crop both images to "
                                 "before embedding; must match the images' size.")),
            "crop_margin": ("FLOAT", inp("Margin added around the mask's box, as a fraction "
                                         "of the box size.", default=0.1, min=0.0, max=2.0,
                                         step=0.05)),
        }}

    def score(self, identity_encoder, edited, source, mask=None, crop_margin=0.1):
        if mask is not None:
            edited = id_lib.crop_to_mask(edited, mask, crop_margin)
            source = id_lib.crop_to_mask(source, mask, crop_margin)
        with torch.no_grad():
            scores = id_lib.ips(identity_encoder, edited, source).float().cpu()
        mean = float(scores.mean())
        report = (f"IPS ({identity_encoder.kind}) mean {mean:.4f} over {len(scores)} "
                  f"image(s): " + ", ".join(f"{s:.4f}" for s in scores.tolist()))
        return {"ui": {"text": [report]}, "result": (mean, report)}


NODES = [LoadIdentityEncoder, IdentityScore]
