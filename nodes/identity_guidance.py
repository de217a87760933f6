"""Identity guidance nodes: embed the source identity, and the sampling control that
keeps it (docs/algorithms.md section 8)."""

from __future__ import annotations

from ..mgie_core import identity_guidance as idg
from ..mgie_core.images import check_image, check_mask
from ._common import IDENTITY_ENCODER, PREFIX, ControlNode, category, inp

ID_EMBEDDING = "XMGIE_ID_EMBEDDING"   # mgie_core.identity_guidance.IdentityEmbedding


class IdentityEmbed:
    NODE_ID = f"{PREFIX}IdentityEmbed"
    DISPLAY_NAME = "xMGIE Identity Embedding"
    CATEGORY = category("identity")
    DESCRIPTION = ("Computes the identity embedding e_id of the source image with a frozen "
                   "identity encoder (face recognition or CLIP), optionally of the mask's "
                   "box only. Feeds xMGIE Identity Guidance.")
    RETURN_TYPES = (ID_EMBEDDING,)
    RETURN_NAMES = ("embedding",)
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_encoder": (IDENTITY_ENCODER, inp(
                "An encoder from xMGIE Load Identity Encoder; use the same one in the "
                "guidance node.")),
            "image": ("IMAGE", inp("The source image whose identity is kept.")),
        }, "optional": {
            "mask": ("MASK", inp("Region of the subject (e.g. the face); the image is "
                                 "cropped to its box before embedding, and the guidance "
                                 "then crops the same way. Must match the image's size.")),
            "crop_margin": ("FLOAT", inp("Margin added around the mask's box, as a fraction "
                                         "of the box size.", default=0.1, min=0.0, max=2.0,
                                         step=0.05)),
        }}

    def embed(self, identity_encoder, image, mask=None, crop_margin=0.1):
        image = check_image("image", image)
        if mask is not None:
            mask = check_mask("mask", mask, size=tuple(image.shape[1:3]))
        return (idg.embed_identity(identity_encoder, image, mask, crop_margin),)


class IdentityGuidanceNode(ControlNode):
    NODE_ID = f"{PREFIX}IdentityGuidance"
    DISPLAY_NAME = "xMGIE Identity Guidance"
    DESCRIPTION = ("Identity guidance inside the sampler: during a window of steps, the "
                   "predicted clean image is decoded and the latent is nudged (inside the "
                   "mask) towards the source's identity embedding, by the gradient of "
                   "1 - cos(E_id(decoded), e_id). Chain it into the two-branch sampler. "
                   "With an edit plan whose subject is not a person it stands aside (the "
                   "sampler's text output says so).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_encoder": (IDENTITY_ENCODER, inp(
                "The encoder the embedding was made with.")),
            "embedding": (ID_EMBEDDING, inp("From xMGIE Identity Embedding (of the source "
                                            "image).")),
            "start": ("FLOAT", inp("First step of the window, as a fraction of the steps "
                                   "(0.2: step 10 of 50).", default=0.2, min=0.0, max=1.0,
                                   step=0.01)),
            "end": ("FLOAT", inp("End of the window (exclusive), as a fraction of the steps "
                                 "(0.7: up to step 34 of 50).", default=0.7, min=0.0,
                                 max=1.0, step=0.01)),
            "weight": ("FLOAT", inp("Step size: RMS change of the predicted clean latent "
                                    "per step. 0 turns the guidance off.", default=0.05,
                                    min=0.0, max=2.0, step=0.01)),
            "memory": (list(idg.MEMORY_MODES), inp(
                "checkpoint: exact gradient, recomputes the VAE decoder in the backward "
                "pass (less memory, a bit slower). downscale: decodes a half-size latent "
                "(least memory, approximate). none: fastest, most memory.",
                default="checkpoint")),
        }, "optional": {
            "mask": cls.mask_input("Region where the latent may change (the subject).",
                                   "Identity guidance needs one of the two."),
            "controls": cls.CHAIN_INPUT,
            "plan": cls.plan_input("Optional edit plan: says whether the subject is a "
                                   "person."),
            "only_people": ("BOOLEAN", inp(
                "On: when the edit plan (this node's, else the sampler's) says the subject "
                "is not a person, stand aside for the run (no update; the sampler's text "
                "output says so). Without a plan it always acts. Off: always act (e.g. "
                "with a CLIP encoder for objects).", default=True)),
        }}

    def control(self, identity_encoder, embedding, start, end, weight, memory, mask=None,
                plan=None, only_people=True):
        return idg.IdentityGuidance(identity_encoder, embedding, mask=mask, start=start,
                                    end=end, weight=weight, memory=memory, plan=plan,
                                    only_people=only_people)


NODES = [IdentityEmbed, IdentityGuidanceNode]
