"""The training chat template (spec §5), defined once: every prompt the project builds goes through it.

Layout per message: `<|start_header_id|>{role}<|end_header_id|>\\n` + content + `<|eot_id|>`, then "\\n"
except after an assistant message; a default system message comes first. Images render as
`<img><IMG_CONTEXT></img>` (the processor widens the single `<IMG_CONTEXT>` to the image's token count).
Assistant text and its `<|eot_id|>` sit in a `{% generation %}` block: those are the training labels.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.processing.tokens import MASK_TOKEN, caption_slot_token, reserved_token

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Message content is a string or a list of items {"type": "text", "text": ...} | {"type": "image"} |
# {"type": "video"}. For item lists the rendering is identical to the released checkpoints'
# `chat_template.json` (a test checks it); plain strings are accepted as well.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|start_header_id|>system<|end_header_id|>\n" + DEFAULT_SYSTEM_PROMPT + "<|eot_id|>\n"
    "{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n"
    "{% if message['content'] is string %}"
    "{% set items = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set items = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{% for item in items %}{{ item['text'] }}{% endfor %}<|eot_id|>{% endgeneration %}"
    "{% else %}"
    "{% for item in items %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}<img><IMG_CONTEXT></img>"
    "{% elif item['type'] == 'video' or 'video' in item %}<video><VIDEO_CONTEXT></video>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "<|eot_id|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n{% endif %}"
)

ROLES = ("system", "user", "assistant")


def render_chat(
    messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation with the training template.

    Returns the text and the character spans `(start, end)` of the assistant parts to be generated
    (the answer text plus its `<|eot_id|>`), which become the training labels.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise PerceptionDLMError(
                f"Message {i} must be a dict with 'role' in {ROLES} and 'content', got {message!r}."
            )
    rendered, spans = render_jinja_template(
        [messages],
        chat_template=CHAT_TEMPLATE,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0], [tuple(span) for span in spans[0]]


DEFAULT_REGION_QUESTION = "Describe each masked region in detail."


def region_messages(
    num_regions: int,
    *,
    question: str = DEFAULT_REGION_QUESTION,
    captions: list[str] | None = None,
    gen_length: int | None = None,
    mask_token: str = MASK_TOKEN,
) -> list[dict[str, Any]]:
    """The parallel region-captioning conversation (spec §3.5) for `num_regions` area-sorted regions.

    User turn: the image, then `<|reserved_token_i|>\\n` per region (each later widened to its RoI tokens),
    then `question`. Assistant turn: `<|Mask_Cap_i|>` + answer for each region, joined by "\\n", where the
    answer is `captions[i]` (training) or `gen_length` × `mask_token` (inference). With neither, the
    conversation ends after the user turn (render it with `add_generation_prompt=True`).
    """
    if num_regions < 1:
        raise PerceptionDLMError(f"Region captioning needs at least one region, got {num_regions}.")
    if captions is not None and gen_length is not None:
        raise PerceptionDLMError("Give either captions (training) or gen_length (inference), not both.")
    regions = "".join(reserved_token(i) + "\n" for i in range(num_regions))
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": regions + question}]}
    if captions is not None:
        if len(captions) != num_regions:
            raise PerceptionDLMError(f"{len(captions)} captions for {num_regions} regions; give one per region.")
        answers = list(captions)
    elif gen_length is not None:
        if gen_length < 1:
            raise PerceptionDLMError(f"gen_length must be at least 1, got {gen_length}.")
        answers = [mask_token * gen_length] * num_regions
    else:
        return [user]
    answer = "\n".join(caption_slot_token(i) + text for i, text in enumerate(answers))
    return [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
