"""Affect readout of a session state: valence, arousal and distance to the set-point."""

from __future__ import annotations

import math

import numpy as np
import torch

from senab.state import Affect


def read_affect(state: np.ndarray, set_point: np.ndarray, *, arousal_scale: float,
                probe: torch.nn.Linear | None = None) -> Affect:
    """Return the affect of `state`.

    distance = ||s - s*||; arousal = tanh(distance / arousal_scale), in [0, 1), with the
    scale fixed in the checkpoint; valence = tanh(a . s + b) from the checkpoint's linear
    probe, or None when the checkpoint has no trained probe.
    """
    delta = np.asarray(state, np.float64) - np.asarray(set_point, np.float64)
    distance = float(np.linalg.norm(delta))
    arousal = math.tanh(distance / arousal_scale)
    valence = None
    if probe is not None:
        with torch.no_grad():
            s = torch.as_tensor(np.asarray(state, np.float32), device=probe.weight.device)
            valence = float(torch.tanh(probe(s)).item())
    return Affect(valence=valence, arousal=arousal, distance=distance)
