import math
import struct

import numpy as np
import pytest

from senab.affect import read_affect
from senab.state import Affect, Homeostasis, RecordError, SessionRecord, TrajectoryPoint

CHECKPOINT = "0123456789abcdef"


def record(**overrides) -> SessionRecord:
    values = dict(checkpoint_id=CHECKPOINT, state=np.linspace(-1, 1, 32).astype(np.float32), turn=3,
                  updated_at=1_700_000_000.5, last_digest=bytes(range(32)), last_reply="Hi 😀 é שלום",
                  last_finish_reason="length", last_prompt_tokens=40, last_completion_tokens=7)
    values.update(overrides)
    return SessionRecord(**values)


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.2), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.3, 0.7)])
def test_homeostasis_update_law(alpha, beta):
    rng = np.random.default_rng(0)
    s, n, target = (rng.normal(size=32).astype(np.float32) for _ in range(3))

    new = Homeostasis(alpha, beta).update(s, n, target)

    np.testing.assert_allclose(new, s + alpha * (n - s) + beta * (target - s), rtol=1e-6, atol=1e-6)


def test_homeostasis_relaxes_to_set_point():
    law = Homeostasis(alpha=0.5, beta=0.2)
    target = np.zeros(32, np.float32)
    s = law.update(target, np.full(32, 4.0, np.float32), target)  # one provocation
    distances = [float(np.linalg.norm(s))]
    for _ in range(5):  # neutral turns read the set-point
        s = law.update(s, target, target)
        distances.append(float(np.linalg.norm(s)))

    assert distances[0] > 0
    assert all(b < a for a, b in zip(distances, distances[1:]))
    assert distances[2] < distances[0] / 2


@pytest.mark.parametrize("alpha, beta", [(-0.1, 0.2), (0.5, -0.1), (0.8, 0.3), (math.nan, 0.1)])
def test_homeostasis_rejects_out_of_range(alpha, beta):
    with pytest.raises(ValueError, match="alpha"):
        Homeostasis(alpha, beta)


def test_record_round_trip():
    original = record()
    decoded = SessionRecord.decode(original.encode(), checkpoint_id=CHECKPOINT)

    np.testing.assert_array_equal(decoded.state, original.state)
    assert (decoded.turn, decoded.updated_at, decoded.last_digest) == (3, original.updated_at, original.last_digest)
    assert decoded.last_reply == original.last_reply
    assert decoded.last_finish_reason == "length"
    assert (decoded.last_prompt_tokens, decoded.last_completion_tokens) == (40, 7)


def test_fresh_record_round_trip():
    fresh = SessionRecord.start(CHECKPOINT, np.zeros(32, np.float32))
    decoded = SessionRecord.decode(fresh.encode())

    assert decoded.turn == 0
    assert decoded.last_digest == b""
    assert decoded.last_finish_reason is None


def test_record_from_other_checkpoint_rejected():
    data = record().encode()
    with pytest.raises(RecordError, match="fedcba9876543210"):
        SessionRecord.decode(data, checkpoint_id="fedcba9876543210")


def test_record_with_nan_rejected_on_decode():
    data = bytearray(record().encode())
    head = struct.calcsize("<4sHH16sId")
    data[head:head + 4] = struct.pack("<f", math.nan)
    with pytest.raises(RecordError, match="NaN"):
        SessionRecord.decode(bytes(data), checkpoint_id=CHECKPOINT)


def test_record_with_huge_values_rejected():
    state = np.zeros(32, np.float32)
    state[0] = 3e38
    with pytest.raises(RecordError, match="beyond"):
        record(state=state).encode()


def test_record_with_inf_rejected_on_encode():
    state = np.zeros(32, np.float32)
    state[5] = np.inf
    with pytest.raises(RecordError, match="NaN or Inf"):
        record(state=state).encode()


@pytest.mark.parametrize("damage", ["truncated", "magic", "version", "trailing", "empty"])
def test_damaged_record_rejected(damage):
    data = bytearray(record().encode())
    if damage == "truncated":
        data = data[:-5]
    elif damage == "magic":
        data[:4] = b"XXXX"
    elif damage == "version":
        data[4:6] = struct.pack("<H", 99)
    elif damage == "trailing":
        data += b"extra"
    else:
        data = bytearray()
    with pytest.raises(RecordError):
        SessionRecord.decode(bytes(data), checkpoint_id=CHECKPOINT)


def test_point_round_trip():
    point = TrajectoryPoint(turn=4, time=1.5, affect=Affect(valence=None, arousal=0.25, distance=1.25),
                            state=np.arange(32, dtype=np.float32))
    decoded = TrajectoryPoint.decode(point.encode())

    assert (decoded.turn, decoded.time, decoded.affect) == (4, 1.5, point.affect)
    np.testing.assert_array_equal(decoded.state, point.state)
    assert len(point.encode()) < 200


def test_affect_readout():
    set_point = np.zeros(32, np.float32)
    state = np.zeros(32, np.float32)
    state[0] = 3.0

    affect = read_affect(state, set_point, arousal_scale=2.0)

    assert affect.distance == pytest.approx(3.0)
    assert affect.arousal == pytest.approx(math.tanh(1.5))
    assert affect.valence is None
    assert read_affect(set_point, set_point, arousal_scale=2.0).arousal == 0.0
