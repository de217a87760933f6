"""Segment Anything nodes: load a SAM checkpoint, segment images from points and a box."""

from __future__ import annotations

import torch

from ..mgie_core import host, paths
from ..mgie_core import masks as masks_lib
from ..mgie_core.errors import InputError
from ..mgie_core.models import sam as sam_lib
from ._common import PREFIX, SAM_MODEL, SD_MODEL, category, inp, plan_input


class LoadSAM:
    NODE_ID = f"{PREFIX}LoadSAM"
    DISPLAY_NAME = "xMGIE Load SAM"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads a Segment Anything checkpoint (sam_vit_h/l/b .pth) from the 'sams' "
                   "models folder. The architecture is read from the file.")
    RETURN_TYPES = (SAM_MODEL,)
    RETURN_NAMES = ("sam",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sam_name": (paths.list_models(paths.SAM), inp(
                "SAM checkpoint in models/sams (official: sam_vit_b_01ec64.pth, "
                "sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth).")),
        }}

    def load(self, sam_name):
        return (sam_lib.load_sam(sam_name, device=host.device()),)


class SAMSegment:
    NODE_ID = f"{PREFIX}SAMSegment"
    DISPLAY_NAME = "xMGIE SAM Segment"
    CATEGORY = category("masks")
    DESCRIPTION = ("Segments each image with Segment Anything from positive points, negative "
                   "points and/or a box (coordinates from the top-left corner, in pixels or as "
                   "percentages of the image size: '50%,80%' fits a photo of any size). With "
                   "multimask on, the mask with the highest predicted IoU is kept. With an "
                   "edit plan and no points or box typed, the prompt is the box of the plan "
                   "object's cross-attention (needs the SD model).")
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    FUNCTION = "segment"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", inp("Images to segment; every image gets the same prompts.")),
            "sam": (SAM_MODEL, inp("A SAM model from xMGIE Load SAM.")),
            "points": ("STRING", inp("Positive points on the object, 'x,y; x,y' in pixels, or "
                                     "in % of the image size ('50%,80%'; any size).",
                                     default="", multiline=False)),
            "negative_points": ("STRING", inp(
                "Points that are NOT the object, 'x,y; x,y' in pixels or % of "
                "the image size (may be empty).",
                default="", multiline=False)),
            "box": ("STRING", inp("Optional box around the object, 'x0,y0,x1,y1' in pixels "
                                  "or % of the image size (empty for none).", default="",
                                  multiline=False)),
            "multimask": ("BOOLEAN", inp("Predict three candidate masks and keep the one "
                                         "with the highest predicted IoU (best for a single "
                                         "ambiguous point).", default=True)),
        }, "optional": {
            "plan": plan_input("the prompt when no points or box are typed: the box of "
                               "the attention mask of the plan's object"),
            "sd_model": (SD_MODEL, inp("Text-to-image SD 1.x, SD 2.x or SDXL model whose "
                                       "cross-attention finds the plan's object (only with "
                                       "a plan and no points or box).")),
        }}

    def segment(self, image, sam, points, negative_points, box, multimask, plan=None,
                sd_model=None):
        # Parsed per image: a percentage is of that image's own size.
        def prompts(img):
            size = (int(img.shape[1]), int(img.shape[0]))
            return (sam_lib.parse_points(points, "points", size),
                    sam_lib.parse_points(negative_points, "negative_points", size),
                    sam_lib.parse_box(box, "box", size))

        if not any(prompts(image[0])) and plan is not None:
            if sd_model is None:
                raise InputError("sd_model", "is not connected, but the plan's object must "
                                 "be found to prompt SAM",
                                 "a text-to-image SD 1.x, SD 2.x or SDXL model",
                                 "Connect the SD model, or type points or a box.")
            prompt, word = masks_lib.prompt_and_word("", "", plan)
            return (torch.stack([masks_lib.attention_mask_sam(sd_model, sam, img.clone()[None],
                                                              prompt, word).cpu()
                                 for img in image]),)
        masks = []
        for img in image:
            pos, neg, rect = prompts(img)
            masks.append(sam_lib.segment(sam, img, points=pos + neg,
                                         labels=[1] * len(pos) + [0] * len(neg), box=rect,
                                         multimask=multimask)[0])
        return (torch.stack(masks).cpu(),)


NODES = [LoadSAM, SAMSegment]
