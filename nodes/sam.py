"""Segment Anything nodes: load a SAM checkpoint, segment images from points and a box."""

from __future__ import annotations

import torch

from ..mgie_core import paths, runtime
from ..mgie_core.models import sam as sam_lib
from ._common import PREFIX, SAM_MODEL, category, inp


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
        return (sam_lib.load_sam(sam_name, device=runtime.device()),)


class SAMSegment:
    NODE_ID = f"{PREFIX}SAMSegment"
    DISPLAY_NAME = "xMGIE SAM Segment"
    CATEGORY = category("masks")
    DESCRIPTION = ("Segments each image with Segment Anything from positive points, negative "
                   "points and/or a box (pixel coordinates from the top-left corner). With "
                   "multimask on, the mask with the highest predicted IoU is kept.")
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    FUNCTION = "segment"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", inp("Images to segment; every image gets the same prompts.")),
            "sam": (SAM_MODEL, inp("A SAM model from xMGIE Load SAM.")),
            "points": ("STRING", inp("Positive points on the object, 'x,y; x,y' in pixels.",
                                     default="", multiline=False)),
            "negative_points": ("STRING", inp(
                "Points that are NOT the object, 'x,y; x,y' in pixels (may be empty).",
                default="", multiline=False)),
            "box": ("STRING", inp("Optional box around the object, 'x0,y0,x1,y1' in pixels "
                                  "(empty for none).", default="", multiline=False)),
            "multimask": ("BOOLEAN", inp("Predict three candidate masks and keep the one "
                                         "with the highest predicted IoU (best for a single "
                                         "ambiguous point).", default=True)),
        }}

    def segment(self, image, sam, points, negative_points, box, multimask):
        pos = sam_lib.parse_points(points, "points")
        neg = sam_lib.parse_points(negative_points, "negative_points")
        box = sam_lib.parse_box(box)
        labels = [1] * len(pos) + [0] * len(neg)
        masks = [sam_lib.segment(sam, img, points=pos + neg, labels=labels, box=box,
                                 multimask=multimask)[0]
                 for img in image]
        return (torch.stack(masks).cpu(),)


NODES = [LoadSAM, SAMSegment]
