"""A-STAR control node: separates the concepts of a multi-concept target prompt."""

from __future__ import annotations

from ..mgie_core import astar
from ..mgie_core.plan import split_words
from ._common import PREFIX, ControlNode, inp


class AStarControlNode(ControlNode):
    NODE_ID = f"{PREFIX}AStarControl"
    DISPLAY_NAME = "xMGIE A-STAR Concept Separation"
    DESCRIPTION = ("A-STAR (attention segregation and retention): in the early steps, nudges "
                   "the edit latent so the cross-attention maps of the listed concept words "
                   "of the target prompt overlap less and each keeps the region it had at the "
                   "step before, against concepts merging or vanishing in multi-concept "
                   "prompts ('a cat and a dog'). Give two or more words: with one, only "
                   "retention acts, and a word that CAM confines to the mask (cam_in_words) "
                   "has nothing to retain where the mask covers one cell of A-STAR's maps "
                   "(1/32 of the image side: small masks, small images, --tiny), so no "
                   "update applies; name the edited word and the object it changes "
                   "('yellow, carpet').")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "words": ("STRING", inp("Comma-separated concept words of the target prompt, "
                                    "e.g. 'cat, dog' (two or more to separate them; one "
                                    "only keeps its region, see the description). "
                                    "Empty: the plan's edit words.", default="")),
            "steps_fraction": ("FLOAT", inp("Share of the steps, from the start, that are "
                                            "optimised (0.5: the first 25 of 50).",
                                            default=0.5, min=0.0, max=1.0, step=0.05)),
            "step_size": ("FLOAT", inp("Update size: the latent moves by step_size x "
                                       "sigma_t x gradient (2.5 as MAG-Edit).",
                                       default=2.5, min=0.0, max=100.0, step=0.1)),
            "threshold": ("FLOAT", inp("Region a concept must keep: where its map is at "
                                       "least this fraction of its peak.",
                                       default=0.5, min=0.01, max=1.0, step=0.05)),
        }, "optional": {
            "mask": cls.mask_input("Only change the latent inside this region (white).",
                                   "With neither, the latent changes everywhere."),
            "controls": cls.CHAIN_INPUT,
            "plan": cls.plan_input("Optional edit plan for words (typed words win, empty "
                                   "ones take the plan's edit words)."),
        }}

    def control(self, words, steps_fraction, step_size, threshold, mask=None, plan=None):
        return astar.AStarControl(split_words(words), steps_fraction=steps_fraction,
                                  step_size=step_size, threshold=threshold, mask=mask,
                                  plan=plan)


NODES = [AStarControlNode]
