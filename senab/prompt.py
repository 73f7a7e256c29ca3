"""Render an OpenAI message list through the model's chat template.

Besides the token ids, `build_prompt` finds where the current turn starts: the first
token of the last user message's content. The bridge's readout averages the lattice from
there to the end of the reply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    turn_start: int  # index into ids of the first token of the last user message


def template_messages(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Map (role, text) pairs to template messages; "developer" is OpenAI's newer "system"."""
    return [{"role": "system" if role == "developer" else role, "content": text} for role, text in messages]


def build_prompt(tokenizer, messages: list[tuple[str, str]]) -> Prompt:
    """Return the chat-template token ids for `messages` and the current turn's start."""
    rendered = tokenizer.apply_chat_template(template_messages(messages), tokenize=False,
                                             add_generation_prompt=True)
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])

    last_user = next((text for role, text in reversed(messages) if role == "user"), "")
    char_start = rendered.rfind(last_user) if last_user else -1
    turn_start = 0
    if char_start >= 0:
        offsets = encoding["offset_mapping"]
        turn_start = next((i for i, (_, end) in enumerate(offsets) if end > char_start), len(ids) - 1)
    else:
        # The template rewrote the message (or it is empty): the turn is the last token.
        turn_start = len(ids) - 1
    return Prompt(ids=ids, turn_start=turn_start)


def conversation_digest(model: str, messages: list[tuple[str, str]]) -> bytes:
    """Return the sha256 of a request's model and message list, to recognise a retried turn."""
    canonical = json.dumps([model, [[role, text] for role, text in messages]], ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()
