"""State trajectories for the report: per turn, per token, and over a style-jump conversation.

- Per turn: the state after each turn (`train.state_chain`).
- Per token: the state the session would have if the turn ended at token t, that is the
  homeostasis update applied to the running mean of the lattice from the turn's first
  user token to t. At the turn's last token it equals the state after the turn.
- Style jump: one conversation on one topic whose requests change register (academic,
  then child-directed, then poetic), answered greedily by SENAB with its state carried.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from senab.affect import read_affect
from senab.bridge import Checkpoint
from senab.data import Window
from senab.generation import GenerationRequest, Generator, SamplingParams
from senab.prompt import build_prompt

STYLE_JUMP_TOPIC = "the Moon"
STYLE_JUMP_CONVERSATION: list[tuple[str, str]] = [
    ("academic", "Provide a concise academic explanation of why the Moon always shows the same face to Earth."),
    ("academic", "Summarise the leading scientific hypothesis for how the Moon formed."),
    ("child", "Can you tell a five-year-old why the moon changes shape?"),
    ("child", "Why does the moon follow our car at night? Explain it like I'm little."),
    ("poetic", "Write four lines of verse about the moon rising over the sea."),
    ("poetic", "Describe the moon as a poet would, in one lyrical sentence."),
]


@torch.no_grad()
def token_states(checkpoint: Checkpoint, window: Window, hidden: torch.Tensor, turn_index: int,
                 state: torch.Tensor) -> tuple[np.ndarray, int]:
    """Return the would-be state after each token of one turn (T, C) and the reply's offset.

    `hidden` is the input of the first bridged layer for the whole window and `state` the
    session state before the turn. Row 0 is the turn's first user token; row `offset` is
    the reply's first token.
    """
    bridge = checkpoint.bridge
    turn = window.turns[turn_index]
    start = max(0, turn.user_start - bridge.cell.config.receptive_field)
    x0 = bridge.seed_lattice(hidden[:, start:turn.reply_end], state.unsqueeze(0))
    lattice, _ = bridge.cell.grow(x0)
    rows = lattice[0, turn.user_start - start:]
    counts = torch.arange(1, rows.shape[0] + 1, dtype=rows.dtype, device=rows.device).unsqueeze(1)
    running = rows.cumsum(0) / counts
    law = checkpoint.homeostasis
    states = state + law.alpha * (running - state) + law.beta * (bridge.set_point - state)
    return states.cpu().numpy().astype(np.float32), turn.reply_start - turn.user_start


def style_jump(generator: Generator, tokenizer, checkpoint: Checkpoint, *, max_tokens: int = 64) -> list[dict]:
    """Run `STYLE_JUMP_CONVERSATION` through SENAB; return each turn with its reply and state."""
    set_point = checkpoint.bridge.set_point.detach().float().cpu().numpy()
    state = set_point.copy()
    history: list[tuple[str, str]] = []
    turns = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for style, message in STYLE_JUMP_CONVERSATION:
        history.append(("user", message))
        built = build_prompt(tokenizer, history)
        output = generator.generate([GenerationRequest(built.ids, params, session=state,
                                                       turn_start=built.turn_start)])[0]
        state = checkpoint.homeostasis.update(state, output.readout, set_point)
        history.append(("assistant", output.text))
        affect = read_affect(state, set_point, arousal_scale=checkpoint.arousal_scale, probe=checkpoint.probe)
        turns.append({"style": style, "user": message, "reply": output.text.strip(), "state": state,
                      **dataclasses.asdict(affect)})
    return turns


def pca(points: np.ndarray, components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Project `points` (N, C) on their first `components` principal components.

    Return the projection (N, components) and the share of variance each component explains.

    With fewer points than components the missing columns are zero.
    """
    points = np.asarray(points, np.float64)
    centred = points - points.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    available = min(components, vt.shape[0])
    total = float((singular ** 2).sum())
    explained = (singular[:available] ** 2) / total if total > 0 else np.zeros(available)
    projected = centred @ vt[:available].T
    missing = components - available
    return np.pad(projected, ((0, 0), (0, missing))), np.pad(explained, (0, missing))


def json_ready(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in t.items()} for t in turns]
