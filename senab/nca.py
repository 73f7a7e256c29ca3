"""The Neural Cellular Automaton that grows over the token axis.

A lattice of C-channel cells, one per token position, is updated K times by one shared
rule (Sakour, 2026, "Dynamic Contextual Adaptation in LLMs via Neural Cellular Automata
Bridges"):

    p      = causal_conv1d(x, C -> 3C, width w)          # perception
    u      = Linear(64 -> C)(SiLU(LayerNorm(Linear(3C -> 64)(p))))
    g      = sigmoid(Linear(3C -> 1)(p))
    x_next = g * u + (1 - g) * x

The perception is causal, so position t after K steps depends only on positions
t - K*(w-1) .. t. That finite receptive field is what lets `grow` run incrementally: the
caller keeps, per step, the last w-1 rows of the lattice at that step (`NCACache`), and a
chunk of new positions costs K small updates whatever the sequence length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from senab import native

NATIVE_SOURCE = "nca_step.cpp"
NATIVE_FLAGS = (*native.COMMON_FLAGS, "-fopenmp")


@dataclass(frozen=True)
class NCAConfig:
    channels: int = 32
    mlp_hidden: int = 64
    steps: int = 6
    kernel_width: int = 3
    # Initial bias of the gate. At 0 each step keeps half of the old cell, so after six steps
    # 1/64 of the seeded lattice is left and an untrained lattice collapses to one pattern
    # whatever the text. At -2 each step keeps 88%, so about half survives.
    gate_bias: float = -2.0

    def __post_init__(self) -> None:
        for name in ("channels", "mlp_hidden", "steps", "kernel_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"NCAConfig.{name} must be a positive integer, got {value!r}")

    @property
    def receptive_field(self) -> int:
        """Number of earlier positions that can influence a cell after all steps."""
        return self.steps * (self.kernel_width - 1)


# Per step k, the last w-1 lattice rows at step k: a list of K tensors (B, w-1, C).
NCACache = list[torch.Tensor]


def version_key(parameters) -> tuple[tuple[int, int], ...]:
    """Identify the current values of `parameters`, for caching tensors derived from them.

    In-place changes (optimizer steps, `load_state_dict`) bump a tensor's version, and a
    replaced tensor has another data pointer.
    """
    return tuple((p.data_ptr(), p._version) for p in parameters)


class NCACell(nn.Module):
    """One shared update rule applied `steps` times with causal padding."""

    def __init__(self, config: NCAConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.perceive = nn.Conv1d(c, 3 * c, kernel_size=config.kernel_width)
        self.update = nn.Sequential(
            nn.Linear(3 * c, config.mlp_hidden),
            nn.LayerNorm(config.mlp_hidden),
            nn.SiLU(),
            nn.Linear(config.mlp_hidden, c),
        )
        self.gate = nn.Linear(3 * c, 1)
        nn.init.constant_(self.gate.bias, config.gate_bias)
        self._fused: tuple[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _fused_input_layers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Perception, the update's first layer and the gate folded into one affine map.

        For one new position the perception is a linear map of the w-wide window. The
        update's first layer and the gate are linear maps of the perception, so the three
        compose into one matrix, returned transposed as (w*C, mlp_hidden + 1), and a bias.
        Rebuilt whenever one of their parameters changes (an optimizer step or a load bumps
        its version, and a replaced tensor has another data pointer).
        """
        sources = (self.perceive.weight, self.perceive.bias, self.update[0].weight, self.update[0].bias,
                   self.gate.weight, self.gate.bias)
        # Listed rather than read from `self.parameters()`, whose walk over the submodules
        # took 50 us of every decode step's bridge.
        key = version_key(sources)
        if self._fused is None or self._fused[0] != key:
            c, width = self.config.channels, self.config.kernel_width
            # Window index j*C + c is position j (oldest first), channel c.
            perceive = self.perceive.weight.permute(0, 2, 1).reshape(3 * c, width * c)
            first = torch.cat([self.update[0].weight, self.gate.weight])  # (H + 1, 3C)
            bias = torch.cat([self.update[0].bias, self.gate.bias]) + first @ self.perceive.bias
            self._fused = (key, ((first @ perceive).contiguous().t(), bias))
        return self._fused[1]

    def _grow_one(self, x: torch.Tensor, cache: NCACache) -> tuple[torch.Tensor, NCACache]:
        """`grow` for one new position per row, without padding or autograd: the decode step.

        Equal to the general path up to float rounding (the fused map sums in another order).
        Its operations are spelled out, without module calls, because the bridge runs them at
        every decode step and each call costs a few microseconds beyond its arithmetic.
        """
        weight, bias = self._fused_input_layers()
        hidden = self.config.mlp_hidden
        norm, second = self.update[1], self.update[3]
        if x.dtype == torch.float32 and x.device.type == "cpu" and weight.dtype == torch.float32 \
                and norm.weight is not None and norm.bias is not None and len(cache) == self.config.steps \
                and all(entry.dtype == torch.float32 for entry in cache) and native_blocker() is None:
            # One compiled call for all steps (senab/csrc/nca_step.cpp): for one row, 160 us
            # of small operations per decode step became 31 us (2-core Xeon).
            out, new_cache = torch.ops.senab_nca.nca_grow_one(
                x.contiguous(), [entry.contiguous() for entry in cache], weight.t(), bias, norm.weight, norm.bias,
                norm.eps, second.weight, second.bias)
            return out, list(new_cache)
        shape, norm_weight, norm_bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        # `nn.Linear` computes addmm(bias, input, weight.t()) for 2-D input, so this is the same product.
        second_weight, second_bias = second.weight.t(), second.bias
        batch = x.shape[0]
        new_cache: NCACache = []
        for step in range(self.config.steps):
            window = torch.cat([cache[step], x], dim=1)  # (B, w, C)
            new_cache.append(window[:, 1:, :])
            mixed = torch.addmm(bias, window.view(batch, -1), weight)  # (B, H + 1)
            normed = nn.functional.layer_norm(mixed[:, :hidden], shape, norm_weight, norm_bias, eps)
            update = torch.addmm(second_bias, nn.functional.silu(normed), second_weight)
            x = torch.lerp(x, update.unsqueeze(1), torch.sigmoid(mixed[:, hidden:]).unsqueeze(1))
        return x, new_cache

    def empty_cache(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> NCACache:
        """Return the cache of a sequence with no positions yet (zeros are the causal padding)."""
        shape = (batch_size, self.config.kernel_width - 1, self.config.channels)
        return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.config.steps)]

    def grow(self, x: torch.Tensor, cache: NCACache | None = None, valid: torch.Tensor | None = None,
             trace: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, NCACache]:
        """Run all steps over new positions `x` (B, T, C) that follow the ones in `cache`.

        `valid` (B, T) marks real positions; padded ones are held at zero at every step so
        they act exactly like the causal zero padding (a left-padded row grows as if alone).
        Returns the lattice after the last step (B, T, C) and the cache for the next chunk.
        With `cache=None` this is the full computation from an empty sequence. A `trace` list
        receives the lattice before the first step and after every step.
        """
        if cache is None:
            cache = self.empty_cache(x.shape[0], device=x.device, dtype=x.dtype)
        keep = self.config.kernel_width - 1
        if x.shape[1] == 1 and valid is None and trace is None and not torch.is_grad_enabled():
            return self._grow_one(x, cache)
        mask = None if valid is None else valid.unsqueeze(-1)  # (B, T, 1)
        if mask is not None:
            x = torch.where(mask, x, torch.zeros_like(x))

        new_cache: NCACache = []
        if trace is not None:
            trace.append(x)
        for step in range(self.config.steps):
            padded = torch.cat([cache[step], x], dim=1)  # (B, w-1+T, C)
            new_cache.append(padded[:, padded.shape[1] - keep:, :])

            perception = self.perceive(padded.transpose(1, 2)).transpose(1, 2)  # (B, T, 3C)

            update = self.update(perception)
            gate = torch.sigmoid(self.gate(perception))
            x = gate * update + (1.0 - gate) * x

            if mask is not None:
                x = torch.where(mask, x, torch.zeros_like(x))
            if trace is not None:
                trace.append(x)
        return x, new_cache

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.grow(x, None, valid)[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@functools.cache
def native_blocker() -> str | None:
    """Return why the compiled decode step of the automaton cannot serve, or None when it can (builds it once).

    `attach_bridge` calls this at start-up, so that a first build (about 6 s) does not stall a reply.
    """
    return native.load(NATIVE_SOURCE, NATIVE_FLAGS, "senab_nca::nca_grow_one")
