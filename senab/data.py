"""Training data: chitchat conversations, split by conversation, encoded turn by turn.

Source: the `chitchat-dataset` package 0.9.0 (MIT licence; 7,168 open-domain conversations
collected by the BYU PCC lab, of which 4,017 have at least one reply from a second speaker;
the others are dropped). In each conversation the first speaker plays the user and the
second the assistant; consecutive messages of one speaker are joined with newlines. Each user
message carries its VADER compound score (`vaderSentiment`) as the valence label.

A training example is a window of consecutive user/assistant turns rendered through the base
model's chat template. For each turn it records where the user's message starts (the
bridge's readout window) and which tokens belong to the reply (the only tokens with a loss).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

_MARKER = "\x00senab-content\x00"
# VADER compound at or below which a user message counts as negative (VADER's own
# threshold for "negative" is -0.05; -0.3 keeps mild hedges such as "no" out).
NEGATIVE_VALENCE = -0.3


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[tuple[str, str], ...]  # (user message, assistant reply) pairs


@dataclass(frozen=True)
class Split:
    train: list[Conversation]
    validation: list[Conversation]
    test: list[Conversation]


@dataclass
class EncodedTurn:
    user_start: int  # first token of the user's message text
    reply_start: int  # first token of the reply
    reply_end: int  # one past the reply's end-of-turn token
    valence: float  # VADER compound score of the user's message, in [-1, 1]


@dataclass
class Window:
    """Consecutive turns of one conversation as one token sequence."""

    conversation_id: str
    ids: list[int]
    turns: list[EncodedTurn] = field(default_factory=list)

    def loss_positions(self) -> list[int]:
        """Return the indices of the tokens that carry a loss (every reply token)."""
        return [i for turn in self.turns for i in range(turn.reply_start, turn.reply_end)]


def chitchat_path() -> Path:
    try:
        import chitchat_dataset
    except ImportError as exc:
        raise RuntimeError("the chitchat-dataset package is not installed: pip install chitchat-dataset") from exc
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


def load_chitchat(path: str | Path | None = None) -> list[Conversation]:
    """Load every conversation with at least one complete user/assistant turn."""
    raw = json.loads(Path(path or chitchat_path()).read_text())
    conversations = []
    for conversation_id in sorted(raw):
        conversation = _parse_conversation(conversation_id, raw[conversation_id]["messages"])
        if conversation.turns:
            conversations.append(conversation)
    logger.info("loaded %d conversations from chitchat", len(conversations))
    return conversations


def _parse_conversation(conversation_id: str, groups: list[list[dict]]) -> Conversation:
    speakers: list[str] = []
    texts: list[str] = []
    for group in groups:
        utterances = [u["text"].strip() for u in group if u.get("text", "").strip()]
        if not utterances:
            continue
        sender = group[0].get("sender", "")
        if speakers and speakers[-1] == sender:
            texts[-1] += "\n" + "\n".join(utterances)
        else:
            speakers.append(sender)
            texts.append("\n".join(utterances))
    pairs = tuple((texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2))
    return Conversation(id=conversation_id, turns=pairs)


def split_conversations(conversations: Sequence[Conversation], *, seed: int = 0,
                        validation: float = 0.05, test: float = 0.05) -> Split:
    """Shuffle with `seed` and split by conversation, so no conversation spans two parts."""
    order = list(conversations)
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(order) * test))
    n_validation = max(1, round(len(order) * validation))
    return Split(train=order[n_test + n_validation:], validation=order[n_test:n_test + n_validation],
                 test=order[:n_test])


def vader_scores(texts: Iterable[str]) -> list[float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def _content_offsets(tokenizer, messages: list[dict[str, str]], rendered: str) -> list[int]:
    """Return where each message's text starts in `rendered`.

    Each message is rendered once more with its text replaced by a marker: the template
    output before the message is unchanged, so the marker's offset is the text's offset.
    """
    offsets = []
    for i, message in enumerate(messages):
        marked = [dict(m) for m in messages]
        marked[i]["content"] = _MARKER
        offset = tokenizer.apply_chat_template(marked, tokenize=False).find(_MARKER)
        if offset < 0 or not rendered.startswith(message["content"], offset):
            raise ValueError(f"the chat template does not reproduce message {i} verbatim")
        offsets.append(offset)
    return offsets


def encode_window(tokenizer, conversation_id: str, turns: Sequence[tuple[str, str]],
                  valences: Sequence[float]) -> Window:
    """Render the turns through the chat template and locate every turn's spans in tokens."""
    messages = []
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    starts = _content_offsets(tokenizer, messages, rendered)
    end_token = tokenizer.eos_token

    window = Window(conversation_id=conversation_id, ids=ids)
    for k, (user, reply) in enumerate(turns):
        user_char, reply_char = starts[2 * k], starts[2 * k + 1]
        reply_end_char = reply_char + len(reply)
        # The reply's loss includes the end-of-turn token, so the model learns to stop.
        if end_token and rendered.startswith(end_token, reply_end_char):
            reply_end_char += len(end_token)
        user_start = next(i for i, (_, end) in enumerate(offsets) if end > user_char)
        reply_start = next(i for i, (start, end) in enumerate(offsets) if end > reply_char)
        reply_end = next((i for i, (start, _) in enumerate(offsets) if start >= reply_end_char), len(ids))
        window.turns.append(EncodedTurn(user_start=user_start, reply_start=reply_start, reply_end=reply_end,
                                        valence=float(valences[k])))
    return window


def iter_windows(tokenizer, conversations: Sequence[Conversation], *, turns_per_window: int = 4,
                 max_length: int = 512) -> Iterator[Window]:
    """Yield the windows of `make_windows` one by one, in the same order."""
    skipped = 0
    for conversation in conversations:
        scores = vader_scores(user for user, _ in conversation.turns)
        for start in range(0, len(conversation.turns) - turns_per_window + 1, turns_per_window):
            turns = conversation.turns[start:start + turns_per_window]
            window = encode_window(tokenizer, conversation.id, turns, scores[start:start + turns_per_window])
            if len(window.ids) > max_length:
                skipped += 1
                continue
            yield window
    if skipped:
        logger.info("skipped %d windows longer than %d tokens", skipped, max_length)


def make_windows(tokenizer, conversations: Sequence[Conversation], *, turns_per_window: int = 4,
                 max_length: int = 512, max_windows: int | None = None) -> list[Window]:
    """Cut conversations into windows of exactly `turns_per_window` turns that fit `max_length`.

    Windows do not overlap. A window longer than `max_length` tokens is skipped, and so is a
    conversation's tail shorter than `turns_per_window`.
    """
    windows = iter_windows(tokenizer, conversations, turns_per_window=turns_per_window, max_length=max_length)
    return list(itertools.islice(windows, max_windows))


def pick_with_negatives(windows: Iterable[Window], count: int, negative_share: float,
                        threshold: float = NEGATIVE_VALENCE) -> list[Window]:
    """Take `count` windows in order, of which at least `negative_share` hold a user message
    with VADER at most `threshold` (fewer only when `windows` runs out of them).

    Negative messages are rare in chitchat (about 9% of user turns score -0.3 or less), so a
    pool drawn in order would teach the valence probe little about them.
    """
    negative_target = math.ceil(count * negative_share)
    negative: list[Window] = []
    other: list[Window] = []
    for window in windows:
        if len(negative) + len(other) >= count and len(negative) >= negative_target:
            break
        if min(turn.valence for turn in window.turns) <= threshold and len(negative) < negative_target:
            negative.append(window)
        elif len(other) < count:
            other.append(window)
    return negative + other[:count - len(negative)]
