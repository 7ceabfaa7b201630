"""The question templates of the original VLM-R1 project.

Copied from om-ai-lab/VLM-R1, ``src/open-r1-multimodal/src/open_r1/vlm_modules/qwen_module.py``,
``Qwen2VLModule.get_question_template(task_type)`` (``"default"`` is what ``grpo_jsonl.py`` uses;
``"rec"`` is the REC variant asking for JSON; ``"odLength"`` the detection variant; ``"ic"``).
``{Question}`` stands for the question text.
"""

from __future__ import annotations

R1 = ("{Question} First output the thinking process in <think> </think> tags and then output the final "
      "answer in <answer> </answer> tags.")
REC = R1 + " Output the final answer in JSON format."
IC = ("{Question} First thinks about the reasoning process in the mind and then provides the user with the "
      "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
      "tags, respectively, i.e., <think> reasoning process here </think><answer> json format answer here "
      "</answer>")
OD = ("First thinks about the reasoning process in the mind and then provides the user with the answer. "
      "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
      "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
      "\n{Question}")

#: Template name -> template. ``od`` is the original's ``odLength`` task type.
QUESTION_TEMPLATES: dict[str, str] = {"r1": R1, "rec": REC, "ic": IC, "od": OD, "none": "{Question}"}


def resolve_template(value: str) -> str:
    """A template by name, or a custom template that contains ``{Question}`` exactly once."""
    if value in QUESTION_TEMPLATES:
        return QUESTION_TEMPLATES[value]
    if value.count("{Question}") != 1:
        raise ValueError(f"question_template {value!r} is neither one of {', '.join(QUESTION_TEMPLATES)} "
                         "nor a custom template containing '{Question}' exactly once")
    return value


def split_template(template: str) -> tuple[str, str]:
    """``(prefix, suffix)``: the template's text before and after ``{Question}``.

    Templates are applied by plain substitution, not ``str.format``, so a custom template may
    contain other braces (JSON examples) without escaping.
    """
    prefix, _, suffix = template.partition("{Question}")
    return prefix, suffix
