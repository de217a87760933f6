"""Edit plan nodes: typed prompts, the instruction alone or a vision-language model's
plan -> XMGIE_PLAN, which the editing nodes take as an optional input."""

from __future__ import annotations

import logging

from ..mgie_core import plan_answer, plan_rules
from ._common import PLAN, PREFIX, VLM_MODEL, category, inp

log = logging.getLogger(__name__)

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
        p = plan_rules.plan_from_prompts(instruction, source_prompt, target_prompt,
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
                                          "the plan comes back cut off (a plan needs about "
                                          "100 tokens).", default=256,
                                          min=1, max=2048, step=16)),
        }, "optional": {
            "source_caption": ("STRING", inp("A caption of the source image (e.g. from "
                                             "BLIP-2), used when the model gives none.",
                                             multiline=True, default="")),
            "fallback": ("BOOLEAN", inp(
                "When the model's answer cannot be read into a plan (a small or unsuited "
                "model, a refusal), plan from the instruction and the source caption alone "
                "by the documented rules, as xMGIE Edit Plan From Instruction does; the "
                "plan's notes say so. Off: stop with the model's answer and what to try.",
                default=True)),
        }}

    def plan(self, vlm, image, instruction, max_new_tokens, source_caption=None,
             fallback=True):
        from ..mgie_core.models import vlm as vlm_mod  # heavy: only when the node runs

        question = plan_answer.build_plan_prompt(instruction)
        answer = vlm_mod.ask(vlm, image[0], question, max_new_tokens)
        try:
            p = plan_answer.parse_plan(answer, instruction, source_caption or None)
        except plan_answer.PlanParseError as err:
            if not fallback:
                raise
            p = plan_rules.plan_from_instruction(instruction, source_caption or None)
            if not p.target_prompt:
                raise plan_answer.PlanParseError(
                    f"{err.problem}; and the instruction alone gave no target prompt "
                    f"({'; '.join(p.notes)})", err.answer, err.missing) from None
            p.notes.insert(0, f"the model's answer could not be read ({err.problem}): "
                              "planned from the instruction alone")
            log.warning("Edit Plan From VLM: %s", p.notes[0])
        return (p, p.source_prompt, p.target_prompt)


class EditPlanFromInstruction:
    NODE_ID = f"{PREFIX}EditPlanFromInstruction"
    DISPLAY_NAME = "xMGIE Edit Plan From Instruction"
    CATEGORY = category("plan")
    DESCRIPTION = ("Plans the edit from the instruction alone, without a vision-language "
                   "model, by documented rules: the object from the instruction ('make the "
                   "carpet yellow' -> carpet), the source caption (e.g. BLIP-2's) with the "
                   "object added when it does not name it, and the target caption by "
                   "applying the instruction to it (swaps, 'make the X ADJ'). Enough for "
                   "masks and the instruction path; when no rule gives a target caption "
                   "the inversion path asks for one.")
    RETURN_TYPES = _PROMPT_OUT_TYPES
    RETURN_NAMES = _PROMPT_OUT_NAMES
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "instruction": ("STRING", inp("The edit instruction, naming the thing to edit, "
                                          "e.g. 'make the carpet yellow'.", multiline=True,
                                          default="")),
        }, "optional": {
            "source_caption": ("STRING", inp("A caption of the photo (e.g. from BLIP-2). "
                                             "Empty: 'a photo of the OBJECT'.",
                                             multiline=True, default="")),
            "expressive_instruction": ("STRING", inp(
                "MGIE's expressive instruction, kept in the plan (and used to find the "
                "object when the instruction names none).", multiline=True, default="")),
        }}

    def build(self, instruction, source_caption="", expressive_instruction=""):
        p = plan_rules.plan_from_instruction(instruction, source_caption or None,
                                             expressive_instruction or None)
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


NODES = [EditPlanFromPrompts, EditPlanFromVLM, EditPlanFromInstruction, PlanToText]
