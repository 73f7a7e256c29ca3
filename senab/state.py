"""Session state: the homeostasis update law and the versioned binary records.

A session has one C-dimensional state vector s. It starts at the set-point s*, and after each
completed turn with readout n it moves by

    s <- s + alpha * (n - s) + beta * (s* - s)

alpha is reactivity (how far one turn pulls the state toward what it just read) and beta
is recovery (how far it relaxes toward the set-point per turn). With 0 <= alpha, beta and
alpha + beta <= 1 the new state is a convex combination of s, n and s*, so it stays bounded.

Records are little-endian binary so a session costs a few hundred bytes in Redis:

    state record  "SNBS" u16 version, u16 C, 16-byte checkpoint id, u32 turn, f64 updated_at,
                  C x f32 state, 32-byte digest of the last turn's messages,
                  u8 finish reason, u32 prompt tokens, u32 completion tokens,
                  u32 reply length, reply bytes (UTF-8)
    trajectory    "SNBP" u16 version, u16 C, u32 turn, f64 time, f32 valence (NaN = none),
    point         f32 arousal, f32 distance, C x f32 state
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np

RECORD_MAGIC = b"SNBS"
POINT_MAGIC = b"SNBP"
RECORD_VERSION = 1
CHECKPOINT_ID_BYTES = 16
DIGEST_BYTES = 32

_RECORD_HEAD = struct.Struct("<4sHH16sId")
_RECORD_TAIL = struct.Struct("<32sBIII")
_POINT_HEAD = struct.Struct("<4sHHIdfff")
_FINISH_REASONS = (None, "stop", "length")
MAX_TURN = 2**32 - 1  # the record stores the turn as u32
# Largest magnitude accepted in a state vector. Readouts are means of NCA lattice values,
# which are seeded from RMS-normalised hidden states and so stay far below this (an
# estimate), while values near float32's maximum would turn the model's logits into NaN.
MAX_STATE_ABS = 1e4


class RecordError(ValueError):
    """A stored record that must not be used: corrupt, non-finite, or from another checkpoint."""


@dataclass
class Homeostasis:
    """Per-turn update s <- s + alpha (n - s) + beta (s* - s)."""

    alpha: float = 0.5
    beta: float = 0.2

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and self.beta >= 0 and self.alpha + self.beta <= 1):
            raise ValueError(
                f"homeostasis needs 0 <= alpha, 0 <= beta and alpha + beta <= 1; "
                f"got alpha={self.alpha}, beta={self.beta}"
            )

    def update(self, state: np.ndarray, readout: np.ndarray, set_point: np.ndarray) -> np.ndarray:
        state = np.asarray(state, dtype=np.float64)
        new = state + self.alpha * (np.asarray(readout, np.float64) - state) \
            + self.beta * (np.asarray(set_point, np.float64) - state)
        return new.astype(np.float32)


@dataclass
class SessionRecord:
    """Stored state of a session between turns."""

    checkpoint_id: str
    state: np.ndarray  # (C,) float32
    turn: int = 0
    updated_at: float = field(default_factory=time.time)
    last_digest: bytes = b""  # sha256 of the message list of the last committed turn
    last_reply: str = ""
    last_finish_reason: str | None = None
    last_prompt_tokens: int = 0
    last_completion_tokens: int = 0

    @classmethod
    def start(cls, checkpoint_id: str, set_point: np.ndarray) -> SessionRecord:
        """Return a new session at the set-point, turn 0."""
        return cls(checkpoint_id=checkpoint_id, state=np.asarray(set_point, np.float32).copy())

    def encode(self) -> bytes:
        check_state(self.state)
        checkpoint = self.checkpoint_id.encode("ascii")
        if len(checkpoint) != CHECKPOINT_ID_BYTES:
            raise ValueError(f"checkpoint id must be {CHECKPOINT_ID_BYTES} ASCII characters, got {self.checkpoint_id!r}")
        if self.last_digest and len(self.last_digest) != DIGEST_BYTES:
            raise ValueError(f"last_digest must be {DIGEST_BYTES} bytes")
        reply = self.last_reply.encode("utf-8", "surrogatepass")
        state = np.asarray(self.state, dtype="<f4")
        return b"".join((
            _RECORD_HEAD.pack(RECORD_MAGIC, RECORD_VERSION, state.shape[0], checkpoint, self.turn, self.updated_at),
            state.tobytes(),
            _RECORD_TAIL.pack(self.last_digest or bytes(DIGEST_BYTES),
                              _FINISH_REASONS.index(self.last_finish_reason),
                              self.last_prompt_tokens, self.last_completion_tokens, len(reply)),
            reply,
        ))

    @classmethod
    def decode(cls, data: bytes, *, checkpoint_id: str | None = None) -> SessionRecord:
        """Parse a record; with `checkpoint_id`, reject one written under another checkpoint."""
        if len(data) < _RECORD_HEAD.size:
            raise RecordError(f"state record is truncated ({len(data)} bytes)")
        magic, version, channels, checkpoint, turn, updated_at = _RECORD_HEAD.unpack_from(data)
        if magic != RECORD_MAGIC:
            raise RecordError("data is not a SENAB state record (bad magic bytes)")
        if version != RECORD_VERSION:
            raise RecordError(f"state record format version {version} is not supported (this server reads {RECORD_VERSION})")
        offset = _RECORD_HEAD.size
        end_state = offset + 4 * channels
        if len(data) < end_state + _RECORD_TAIL.size:
            raise RecordError(f"state record is truncated ({len(data)} bytes for {channels} channels)")
        state = np.frombuffer(data, dtype="<f4", count=channels, offset=offset).astype(np.float32)
        digest, finish, prompt_tokens, completion_tokens, reply_len = _RECORD_TAIL.unpack_from(data, end_state)
        reply_start = end_state + _RECORD_TAIL.size
        if len(data) != reply_start + reply_len or finish >= len(_FINISH_REASONS):
            raise RecordError("state record is corrupt (length or finish reason out of range)")

        stored_checkpoint = checkpoint.decode("ascii", "replace")
        if checkpoint_id is not None and stored_checkpoint != checkpoint_id:
            raise RecordError(
                f"state record was written under bridge checkpoint {stored_checkpoint}, "
                f"but this server runs {checkpoint_id}"
            )
        check_state(state)
        if not math.isfinite(updated_at):
            raise RecordError("state record has a non-finite timestamp")
        return cls(
            checkpoint_id=stored_checkpoint,
            state=state,
            turn=turn,
            updated_at=updated_at,
            last_digest=b"" if digest == bytes(DIGEST_BYTES) else digest,
            last_reply=data[reply_start:].decode("utf-8", "surrogatepass"),
            last_finish_reason=_FINISH_REASONS[finish],
            last_prompt_tokens=prompt_tokens,
            last_completion_tokens=completion_tokens,
        )


def check_state(state: np.ndarray) -> None:
    # One comparison for the usual case (NaN fails it too), because every turn checks its
    # state three times: 6.6 against 20 us per check on a 2-core AMD EPYC.
    if (np.abs(state) <= MAX_STATE_ABS).all():
        return
    if not np.all(np.isfinite(state)):
        raise RecordError("state vector contains NaN or Inf")
    if np.any(np.abs(state) > MAX_STATE_ABS):
        raise RecordError(f"state vector has values beyond +-{MAX_STATE_ABS:g}")


@dataclass(frozen=True)
class Affect:
    """The readout reported with every state; valence is None without a trained probe."""

    valence: float | None
    arousal: float
    distance: float


@dataclass
class TrajectoryPoint:
    turn: int
    time: float
    affect: Affect
    state: np.ndarray

    def encode(self) -> bytes:
        check_state(self.state)
        state = np.asarray(self.state, dtype="<f4")
        valence = math.nan if self.affect.valence is None else self.affect.valence
        return _POINT_HEAD.pack(POINT_MAGIC, RECORD_VERSION, state.shape[0], self.turn, self.time,
                                valence, self.affect.arousal, self.affect.distance) + state.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> TrajectoryPoint:
        if len(data) < _POINT_HEAD.size:
            raise RecordError(f"trajectory point is truncated ({len(data)} bytes)")
        magic, version, channels, turn, when, valence, arousal, distance = _POINT_HEAD.unpack_from(data)
        if magic != POINT_MAGIC or version != RECORD_VERSION:
            raise RecordError("data is not a SENAB trajectory point of a supported version")
        if len(data) != _POINT_HEAD.size + 4 * channels:
            raise RecordError("trajectory point is corrupt (length does not match its channel count)")
        state = np.frombuffer(data, dtype="<f4", count=channels, offset=_POINT_HEAD.size).astype(np.float32)
        return cls(turn=turn, time=when,
                   affect=Affect(None if math.isnan(valence) else valence, arousal, distance), state=state)
