"""Affect readout of a session state: valence, arousal and distance to the set-point."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from senab.state import Affect


@dataclass(frozen=True)
class ProbeWeights:
    """A valence probe's weights as NumPy values, read once from its `torch.nn.Linear`.

    A torch call cost about 0.1 ms on a 2-core AMD EPYC and the server reads affect on
    every commit, so `SessionService` keeps the probe in this form.
    """

    weight: np.ndarray  # (C,) float64
    bias: float

    @classmethod
    def of(cls, probe: torch.nn.Linear) -> ProbeWeights:
        bias = float(probe.bias.detach().cpu()) if probe.bias is not None else 0.0
        return cls(probe.weight.detach().cpu().numpy().astype(np.float64).reshape(-1), bias)


def read_affect(state: np.ndarray, set_point: np.ndarray, *, arousal_scale: float,
                probe: torch.nn.Linear | ProbeWeights | None = None) -> Affect:
    """Return the affect of `state`.

    distance = ||s - s*||; arousal = tanh(distance / arousal_scale), in [0, 1), with the
    scale fixed in the checkpoint; valence = tanh(a . s + b) from the checkpoint's linear
    probe, or None when the checkpoint has no trained probe. Computed in float64.
    """
    state = np.asarray(state, np.float64)
    distance = float(np.linalg.norm(state - np.asarray(set_point, np.float64)))
    arousal = math.tanh(distance / arousal_scale)
    valence = None
    if probe is not None:
        weights = probe if isinstance(probe, ProbeWeights) else ProbeWeights.of(probe)
        valence = math.tanh(float(weights.weight @ state.reshape(-1)) + weights.bias)
    return Affect(valence=valence, arousal=arousal, distance=distance)
