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
    rendered = _render(tokenizer, messages)
    # NOTE: special-token text inside a message ("<|im_end|>") becomes the real special
    # token here, as with the model's own template; escaping it would need per-message encoding.
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])

    char_start = _last_user_offset(tokenizer, messages, rendered)
    if char_start is None:
        # The template rewrote the message (or it is empty): the turn is the last token.
        return Prompt(ids=ids, turn_start=len(ids) - 1)
    offsets = encoding["offset_mapping"]
    turn_start = next((i for i, (_, end) in enumerate(offsets) if end > char_start), len(ids) - 1)
    return Prompt(ids=ids, turn_start=turn_start)


def _render(tokenizer, messages: list[tuple[str, str]]) -> str:
    return tokenizer.apply_chat_template(template_messages(messages), tokenize=False, add_generation_prompt=True)


def _last_user_offset(tokenizer, messages: list[tuple[str, str]], rendered: str) -> int | None:
    """Return the character offset of the last user message's text in `rendered`.

    The template is rendered a second time with that text replaced by a marker. Everything
    before the message renders the same, so the marker's offset is the message's offset;
    searching for the text itself could match template text after it (a message such as
    "assistant").
    """
    index = next((i for i in range(len(messages) - 1, -1, -1) if messages[i][0] == "user"), None)
    if index is None or not messages[index][1]:
        return None
    text = messages[index][1]
    marker = "\x00senab-turn-start\x00"
    marked = list(messages)
    marked[index] = ("user", marker)
    offset = _render(tokenizer, marked).find(marker)
    if offset >= 0 and rendered.startswith(text, offset):
        return offset
    offset = rendered.rfind(text)
    return offset if offset >= 0 else None


def conversation_digest(model: str, messages: list[tuple[str, str]]) -> bytes:
    """Return the sha256 of a request's model and message list, to recognise a retried turn."""
    canonical = json.dumps([model, [[role, text] for role, text in messages]], ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()
