"""Edit plan nodes: typed prompts or a vision-language model's plan -> XMGIE_PLAN."""

from __future__ import annotations

from ..mgie_core import plan as plan_mod
from ._common import PREFIX, VLM_MODEL, category, inp

PLAN = "XMGIE_PLAN"              # mgie_core.plan.EditPlan

_PROMPT_OUT_TYPES = (PLAN, "STRING", "STRING")
_PROMPT_OUT_NAMES = ("plan", "source_prompt", "target_prompt")


class EditPlanFromPrompts:
    NODE_ID = f"{PREFIX}EditPlanFromPrompts"
    DISPLAY_NAME = "xMGIE Edit Plan From Prompts"
    CATEGORY = category("plan")
    DESCRIPTION = ("Builds an edit plan from prompts you type: the source caption, the "
                   "target caption, the words that carry the edit and the object to "
                   "segment. Empty edit words are found by diffing the two prompts; an "
                   "empty object is guessed from the instruction.")
    RETURN_TYPES = _PROMPT_OUT_TYPES
    RETURN_NAMES = _PROMPT_OUT_NAMES
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "instruction": ("STRING", inp("The edit instruction, e.g. 'make the carpet "
                                          "yellow'.", multiline=True, default="")),
            "source_prompt": ("STRING", inp("Caption of the source image (the inversion "
                                            "uses it).", multiline=True, default="")),
            "target_prompt": ("STRING", inp("The same caption after the edit; change only "
                                            "the edited words.", multiline=True,
                                            default="")),
            "edit_words": ("STRING", inp("Comma-separated words of the target prompt that "
                                         "carry the edit (empty: found by diff).",
                                         default="")),
            "object": ("STRING", inp("The thing to segment (empty: guessed from the "
                                     "instruction).", default="")),
        }}

    def build(self, instruction, source_prompt, target_prompt, edit_words, object):
        p = plan_mod.plan_from_prompts(instruction, source_prompt, target_prompt,
                                       edit_words=edit_words or None, object=object or None)
        return (p, p.source_prompt, p.target_prompt)


class EditPlanFromVLM:
    NODE_ID = f"{PREFIX}EditPlanFromVLM"
    DISPLAY_NAME = "xMGIE Edit Plan From VLM"
    CATEGORY = category("plan")
    DESCRIPTION = ("Asks a local vision-language model to plan the edit from the image and "
                   "the instruction (expressive instruction, source and target captions, "
                   "edit words, object to segment), reading its answer robustly and "
                   "filling missing fields with documented fallbacks.")
    RETURN_TYPES = _PROMPT_OUT_TYPES
    RETURN_NAMES = _PROMPT_OUT_NAMES
    FUNCTION = "plan"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vlm": (VLM_MODEL, inp("A loaded vision-language model.")),
            "image": ("IMAGE", inp("The image to edit (the first of the batch is used).")),
            "instruction": ("STRING", inp("The edit instruction, e.g. 'turn the butterfly "
                                          "into a hummingbird'.", multiline=True,
                                          default="")),
            "max_new_tokens": ("INT", inp("Longest answer the model may write; raise it if "
                                          "the plan comes back cut off.", default=256,
                                          min=32, max=2048, step=16)),
        }, "optional": {
            "source_caption": ("STRING", inp("A caption of the source image (e.g. from "
                                             "BLIP-2), used when the model gives none.",
                                             multiline=True, default="")),
        }}

    def plan(self, vlm, image, instruction, max_new_tokens, source_caption=None):
        from ..mgie_core.models import vlm as vlm_mod  # heavy: only when the node runs

        question = plan_mod.build_plan_prompt(instruction)
        answer = vlm_mod.ask(vlm, image[0], question, max_new_tokens)
        p = plan_mod.parse_plan(answer, instruction, source_caption or None)
        return (p, p.source_prompt, p.target_prompt)


class PlanToText:
    NODE_ID = f"{PREFIX}PlanToText"
    DISPLAY_NAME = "xMGIE Edit Plan To Text"
    CATEGORY = category("plan")
    DESCRIPTION = ("Splits an edit plan into text: instruction, expressive instruction, "
                   "prompts, comma-separated edit and source words, the object, notes on "
                   "the fallbacks used, and the whole plan as JSON.")
    RETURN_TYPES = ("STRING",) * 9
    RETURN_NAMES = ("instruction", "expressive_instruction", "source_prompt",
                    "target_prompt", "edit_words", "source_words", "object", "notes", "json")
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "plan": (PLAN, inp("The edit plan to show or wire into text inputs.")),
        }}

    def split(self, plan):
        return (plan.instruction, plan.expressive_instruction, plan.source_prompt,
                plan.target_prompt, ", ".join(plan.edit_words), ", ".join(plan.source_words),
                plan.object, "\n".join(plan.notes), plan.to_json())


NODES = [EditPlanFromPrompts, EditPlanFromVLM, PlanToText]
