"""The SENAB bridge: read-in from the residual stream, NCA growth, write-out into K and V.

Shapes: B batch rows, T new positions, d hidden size, d_kv = KV heads x head dim,
C cell channels, m bridged layers (the last m decoder layers, L-m .. L-1).

1. Read-in at the input of layer L-m: x0_t = s + W_in . rmsnorm(h_t), s the row's
   session vector.
2. Growth: K steps of the NCA (`senab.nca`), incremental across forward calls.
3. Write-out: dk_t = strength * gain_k[l] * tanh(W_k x_t), likewise dv, added to the
   outputs of k_proj and v_proj of each bridged layer l (before rotary embedding).
   W_k and W_v start at zero, so an untrained bridge leaves the base model unchanged.
4. Readout: the running mean of x_t over the positions of the current turn.

`attach_bridge` wraps the projections in place (the originals stay inside the wrappers)
and returns a `BridgeHandle`. A forward pass uses the bridge only inside
`handle.activate(state)`; outside it, or with `handle.enabled = False`, the model
computes exactly what the base model computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from senab.nca import NCACache, NCACell, NCAConfig, native_blocker, version_key
from senab.state import Homeostasis

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "senab-bridge"
CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_FILE = "bridge.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Architecture:
    """Module paths of the decoder layers and K/V projections of one model family."""

    layers: str  # dotted path from the causal-LM module to the list of decoder layers
    attention: str  # attribute of a decoder layer holding the attention block
    k_proj: str
    v_proj: str


# Keyed by `config.model_type`. Adding a family whose attention uses separate k_proj and
# v_proj modules is one entry here.
ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture(layers="model.layers", attention="self_attn", k_proj="k_proj", v_proj="v_proj")
    for name in ("llama", "mistral", "qwen2", "qwen3", "smollm3")
}


def model_shape(model_config: Any) -> tuple[int, int, int]:
    """Return (decoder layers, hidden size, K/V width) of a supported model config."""
    architecture_for(model_config.model_type)
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return model_config.num_hidden_layers, model_config.hidden_size, kv_heads * head_dim


class UnsupportedArchitecture(ValueError):
    pass


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported by the SENAB bridge; supported: {supported}"
        ) from None


@dataclass(frozen=True)
class BridgeConfig:
    hidden_size: int
    kv_width: int
    num_model_layers: int
    model_type: str = "llama"
    bridged_layers: int = 4
    nca: NCAConfig = field(default_factory=NCAConfig)
    strength: float = 0.5
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not 1 <= self.bridged_layers <= self.num_model_layers:
            raise ValueError(
                f"BridgeConfig.bridged_layers must be between 1 and the model's "
                f"{self.num_model_layers} layers, got {self.bridged_layers}"
            )
        if self.strength <= 0:
            raise ValueError(f"BridgeConfig.strength must be positive, got {self.strength}")

    @property
    def first_layer(self) -> int:
        """Index of the first bridged layer, L - m; the read-in sits at its input."""
        return self.num_model_layers - self.bridged_layers

    @classmethod
    def for_model(cls, model_config: Any, **overrides: Any) -> BridgeConfig:
        """Build the config for a transformers model config (Llama-style attributes)."""
        layers, hidden_size, kv_width = model_shape(model_config)
        return cls(hidden_size=hidden_size, kv_width=kv_width, num_model_layers=layers,
                   model_type=model_config.model_type, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BridgeConfig:
        data = dict(data)
        data["nca"] = NCAConfig(**data.get("nca", {}))
        return cls(**data)


class Bridge(nn.Module):
    """All trainable parameters of SENAB; the base model's own weights stay frozen."""

    def __init__(self, config: BridgeConfig) -> None:
        super().__init__()
        self.config = config
        c = config.nca.channels
        self.read_in = nn.Linear(config.hidden_size, c, bias=False)
        self.cell = NCACell(config.nca)
        self.write_k = nn.Linear(c, config.kv_width)
        self.write_v = nn.Linear(c, config.kv_width)
        self.gain_k = nn.Parameter(torch.ones(config.bridged_layers))
        self.gain_v = nn.Parameter(torch.ones(config.bridged_layers))
        # The session state a new conversation starts from and relaxes back to.
        self.set_point = nn.Parameter(torch.zeros(c))
        for layer in (self.write_k, self.write_v):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._fused: tuple[tuple[tuple[int, int], ...], tuple[torch.Tensor, ...]] | None = None
        # What `decode_step` passes, with the versions of every parameter it was built from.
        self._decode_parameters: tuple[nn.Parameter, ...] | None = None
        self._decode_fused: tuple[tuple[tuple[int, int], ...], tuple] | None = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def seed_lattice(self, hidden: torch.Tensor, session: torch.Tensor) -> torch.Tensor:
        """Return x0 = s + W_in . rmsnorm(h) for hidden states (B, T, d) and sessions (B, C)."""
        h = nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), eps=self.config.rms_eps)
        return session.unsqueeze(1) + self.read_in(h)  # (B, T, C)

    def write_out(self, lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the un-gained K and V deltas (B, T, d_kv) for the final lattice."""
        strength = self.config.strength
        return strength * torch.tanh(self.write_k(lattice)), strength * torch.tanh(self.write_v(lattice))

    def gained_deltas(self, lattice: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
        """Return gain * delta for every bridged layer: (m, B, T, 2 d_kv), K then V.

        `enabled` (B,) zeroes the rows with the bridge off. Without autograd the K and V
        write-outs run as one matrix product, and the gains are prepared once per parameter
        change. That makes fewer operations per decode step, with the same values up to
        float rounding.
        """
        rows = enabled.to(lattice.dtype).view(1, -1, 1, 1)
        if torch.is_grad_enabled():
            delta_k, delta_v = self.write_out(lattice)
            return torch.cat([self.gain_k.view(-1, 1, 1, 1) * rows * delta_k,
                              self.gain_v.view(-1, 1, 1, 1) * rows * delta_v], dim=-1)
        weight, bias, gains = self._fused_write_out()
        delta = torch.tanh(torch.addmm(bias, lattice.reshape(-1, lattice.shape[-1]), weight))
        delta = delta.view(*lattice.shape[:-1], -1)  # (B, T, 2 d_kv)
        return (gains * rows) * (self.config.strength * delta)

    def decode_step(self, hidden: torch.Tensor, state: BridgeState) -> torch.Tensor | None:
        """Run the read-in, the automaton, the write-out and the readout sums for one new position per row.

        Returns the gained deltas (m, B, 1, 2 d_kv) in `hidden`'s dtype and updates `state`'s
        NCA cache (in place), positions and readout sums, as the Python path of the read-in
        hook does, up to float rounding. One compiled call (senab/csrc/nca_step.cpp); None
        where it cannot run (another device or dtype, autograd, or no compiled operators),
        and then the caller runs the Python path.
        """
        cache = state.cache
        if (torch.is_grad_enabled() or hidden.device.type != "cpu" or cache is None
                or hidden.dtype not in (torch.float32, torch.bfloat16) or native_blocker() is not None):
            return None
        operands = self._decode_operands()
        if operands is None or len(cache) != self.cell.config.steps:
            return None
        if not all(entry.dtype == torch.float32 and entry.is_contiguous() for entry in cache):
            if any(entry.dtype != torch.float32 for entry in cache):
                return None
            # A prefill leaves views of its lattice; the compiled step updates its own copies.
            state.cache = cache = [entry.contiguous() for entry in cache]
        read_in, fused, fused_bias, norm_weight, norm_bias, norm_eps, second, second_bias, write, write_bias, \
            gains = operands
        return torch.ops.senab_nca.bridge_step(
            hidden.contiguous(), state.sessions, read_in, self.config.rms_eps, cache, fused, fused_bias, norm_weight,
            norm_bias, norm_eps, second, second_bias, write, write_bias, gains, state.row_enabled,
            self.config.strength, state.positions, state.turn_starts, state.readout_sum, state.readout_count)

    def _decode_operands(self) -> tuple | None:
        """Return the weights `decode_step` passes, rebuilt when a parameter changes, or None where not float32."""
        parameters = self._decode_parameters
        if parameters is None:
            parameters = self._decode_parameters = tuple(self.parameters())
        key = version_key(parameters)
        if self._decode_fused is None or self._decode_fused[0] != key:
            norm, second = self.cell.update[1], self.cell.update[3]
            if (any(p.dtype != torch.float32 for p in parameters) or norm.weight is None or norm.bias is None):
                return None
            fused, fused_bias = self.cell._fused_input_layers()
            weight, bias, gains = self._fused_write_out()
            self._decode_fused = (key, (
                self.read_in.weight.contiguous(), fused.t().contiguous(), fused_bias.contiguous(), norm.weight,
                norm.bias, norm.eps, second.weight.contiguous(), second.bias, weight.t().contiguous(),
                bias.contiguous(), gains.reshape(gains.shape[0], -1).contiguous()))
        return self._decode_fused[1]

    def _fused_write_out(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parameters = (self.write_k.weight, self.write_k.bias, self.write_v.weight, self.write_v.bias,
                      self.gain_k, self.gain_v)
        key = version_key(parameters)
        if self._fused is None or self._fused[0] != key:
            width = self.config.kv_width
            weight = torch.cat([self.write_k.weight, self.write_v.weight]).t().contiguous()  # (C, 2 d_kv)
            bias = torch.cat([self.write_k.bias, self.write_v.bias])
            gains = torch.cat([self.gain_k.view(-1, 1).expand(-1, width),
                               self.gain_v.view(-1, 1).expand(-1, width)], dim=1)  # (m, 2 d_kv)
            self._fused = (key, (weight, bias, gains.view(-1, 1, 1, 2 * width)))
        return self._fused[1]


class BridgeState:
    """Per-batch decoding state of the bridge: session vectors, NCA cache, readout sums.

    One instance follows one batch of sequences through prefill and every decode step.
    Before each forward call the caller sets `valid` (B, T) for the new positions.
    """

    def __init__(self, bridge: Bridge, sessions: torch.Tensor, turn_starts: list[int],
                 row_enabled: list[bool] | None = None) -> None:
        if sessions.ndim != 2 or sessions.shape[1] != bridge.config.nca.channels:
            raise ValueError(
                f"session vectors must have shape (batch, {bridge.config.nca.channels}), "
                f"got {tuple(sessions.shape)}"
            )
        if len(turn_starts) != sessions.shape[0]:
            raise ValueError(f"got {len(turn_starts)} turn starts for {sessions.shape[0]} rows")
        device = bridge.read_in.weight.device
        self.sessions = sessions.to(device=device, dtype=torch.float32)
        self.turn_starts = torch.tensor(turn_starts, device=device)
        # Rows with the bridge off (requests for the base model) get no K/V delta at all.
        enabled = [True] * len(turn_starts) if row_enabled is None else row_enabled
        self.row_enabled = torch.tensor(enabled, dtype=torch.bool, device=device)
        self.cache: NCACache | None = None
        self.positions = torch.zeros(len(turn_starts), dtype=torch.long, device=device)  # real tokens seen
        self.readout_sum = torch.zeros_like(self.sessions)
        self.readout_count = torch.zeros(len(turn_starts), device=device)
        self.valid: torch.Tensor | None = None
        # (m, B, T, d_kv) for the current forward call, per bridged layer with its gain.
        self.delta_k: torch.Tensor | None = None
        self.delta_v: torch.Tensor | None = None

    def readout(self) -> torch.Tensor:
        """Return the mean lattice over each row's current-turn positions (B, C)."""
        return self.readout_sum / self.readout_count.clamp(min=1).unsqueeze(-1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (for sequences leaving a batch)."""
        self.sessions = self.sessions[rows]
        self.turn_starts = self.turn_starts[rows]
        self.row_enabled = self.row_enabled[rows]
        self.positions = self.positions[rows]
        self.readout_sum = self.readout_sum[rows]
        self.readout_count = self.readout_count[rows]
        if self.cache is not None:
            self.cache = [c[rows] for c in self.cache]

    def extend(self, other: BridgeState) -> None:
        """Append the rows of `other` (sequences joining a running batch after their prefill)."""
        if (self.cache is None) != (other.cache is None):
            raise ValueError("cannot join a batch state that has run a forward call with one that has not")
        self.sessions = torch.cat([self.sessions, other.sessions])
        self.turn_starts = torch.cat([self.turn_starts, other.turn_starts])
        self.row_enabled = torch.cat([self.row_enabled, other.row_enabled])
        self.positions = torch.cat([self.positions, other.positions])
        self.readout_sum = torch.cat([self.readout_sum, other.readout_sum])
        self.readout_count = torch.cat([self.readout_count, other.readout_count])
        if self.cache is not None:
            self.cache = [torch.cat([a, b]) for a, b in zip(self.cache, other.cache)]


class BridgedProjection(nn.Module):
    """A k_proj or v_proj that adds the bridge's delta for the active batch.

    `add_delta` takes the output of `base` computed elsewhere (`senab.fastdecode` runs the
    base projections of q, k and v as one product).
    """

    def __init__(self, base: nn.Module, handle: BridgeHandle, slot: int, kind: str) -> None:
        super().__init__()
        self.base = base
        self._handle = [handle]  # a list keeps the handle out of the module tree
        self.slot = slot
        self.kind = kind

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.add_delta(self.base(hidden))

    def add_delta(self, out: torch.Tensor) -> torch.Tensor:
        """Return `out`, the base projection's output, plus this layer's delta where the bridge is active."""
        handle = self._handle[0]
        state = handle.active_state
        if state is None or not handle.enabled:
            return out
        delta = state.delta_k if self.kind == "k" else state.delta_v
        if delta is None or delta.shape[1:3] != out.shape[:2]:
            raise RuntimeError("bridge delta does not match this forward call; was the read-in hook skipped?")
        return out + delta[self.slot]


class BridgeHandle:
    """The bridge attached to one model: the switch, the active batch state, and detach."""

    def __init__(self, model: nn.Module, bridge: Bridge) -> None:
        self.model = model
        self.bridge = bridge
        self.enabled = True
        self.active_state: BridgeState | None = None
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []
        self._hook: Any = None

    @contextlib.contextmanager
    def activate(self, state: BridgeState | None) -> Iterator[None]:
        """Use `state` for the forward calls inside the block; None runs the base model."""
        previous = self.active_state
        self.active_state = state
        try:
            yield
        finally:
            self.active_state = previous

    def _read_in(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state = self.active_state
        if state is None or not self.enabled:
            return
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        # valid None means every new position is real (a decode step).
        valid = None if state.valid is None else state.valid.to(hidden.device)
        if valid is None and hidden.shape[1] == 1:
            deltas = self.bridge.decode_step(hidden, state)
            if deltas is not None:
                width = self.bridge.config.kv_width
                state.delta_k, state.delta_v = deltas[..., :width], deltas[..., width:]
                return

        x0 = self.bridge.seed_lattice(hidden, state.sessions)
        lattice, state.cache = self.bridge.cell.grow(x0, state.cache, valid)  # (B, T, C)
        # Gained per bridged layer and zero in switched-off rows, in the model's dtype, so
        # each wrapped projection only adds its slice.
        deltas = self.bridge.gained_deltas(lattice, state.row_enabled).to(hidden.dtype)
        width = self.bridge.config.kv_width
        state.delta_k, state.delta_v = deltas[..., :width], deltas[..., width:]

        # Readout: accumulate the lattice over real positions at or after the turn start.
        if valid is None and hidden.shape[1] == 1:
            # A decode step: the same sums as below in fewer operations.
            weights = (state.positions >= state.turn_starts).float()  # (B,)
            state.positions = state.positions + 1
            state.readout_sum = state.readout_sum + lattice[:, 0] * weights.unsqueeze(-1)
            state.readout_count = state.readout_count + weights
            return
        if valid is None:
            positions = state.positions.unsqueeze(1) + torch.arange(hidden.shape[1], device=hidden.device)
            in_turn = positions >= state.turn_starts.unsqueeze(1)  # (B, T)
            state.positions = state.positions + hidden.shape[1]
        else:
            positions = state.positions.unsqueeze(1) + valid.long().cumsum(1) - 1  # (B, T)
            in_turn = valid & (positions >= state.turn_starts.unsqueeze(1))
            state.positions = state.positions + valid.long().sum(1)
        weights = in_turn.float()
        state.readout_sum = state.readout_sum + (lattice * weights.unsqueeze(-1)).sum(1)
        state.readout_count = state.readout_count + weights.sum(1)

    def detach(self) -> None:
        """Remove the wrappers and the hook, restoring the original modules."""
        for parent, name, original in self._restore:
            setattr(parent, name, original)
        self._restore.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _resolve(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def attach_bridge(model: nn.Module, bridge: Bridge) -> BridgeHandle:
    """Wrap k_proj/v_proj of the last m layers and hook the read-in; return the handle.

    Raises CheckpointError when the bridge was built for another shape of model.
    """
    config = bridge.config
    arch = architecture_for(model.config.model_type)
    layers = _resolve(model, arch.layers)
    _, hidden_size, kv_width = model_shape(model.config)
    if (config.num_model_layers, config.hidden_size, config.kv_width) != (len(layers), hidden_size, kv_width):
        raise CheckpointError(
            f"bridge was built for {config.num_model_layers} layers, hidden size {config.hidden_size} and K/V "
            f"width {config.kv_width}, but the model has {len(layers)}, {hidden_size} and {kv_width}: use a "
            "bridge checkpoint trained for this model (`senab bridge info DIR` shows its base model), or none"
        )
    device = next(model.parameters()).device
    bridge.to(device)
    handle = BridgeHandle(model, bridge)

    for slot, index in enumerate(range(config.first_layer, config.num_model_layers)):
        attention = getattr(layers[index], arch.attention)
        for kind, attr in (("k", arch.k_proj), ("v", arch.v_proj)):
            original = getattr(attention, attr)
            setattr(attention, attr, BridgedProjection(original, handle, slot, kind))
            handle._restore.append((attention, attr, original))

    handle._hook = layers[config.first_layer].register_forward_pre_hook(handle._read_in, with_kwargs=True)
    if device.type == "cpu":
        problem = native_blocker()  # builds the automaton's compiled decode step now rather than at a first reply
        if problem:
            logger.info("the automaton's decode steps run as tensor operations: %s", problem)
    return handle


def freeze_base_model(model: nn.Module, bridge: Bridge) -> None:
    """Freeze every parameter except the bridge's."""
    bridge_ids = {id(p) for p in bridge.parameters()}
    for p in model.parameters():
        if id(p) not in bridge_ids:
            p.requires_grad_(False)
    for p in bridge.parameters():
        p.requires_grad_(True)


def lora_parameter_count(model_config: Any, rank: int = 32) -> int:
    """Trainable parameters of LoRA with `rank` on k_proj and v_proj of every layer."""
    bridge_config = BridgeConfig.for_model(model_config)
    per_projection = rank * (model_config.hidden_size + bridge_config.kv_width)
    return 2 * per_projection * model_config.num_hidden_layers


# ---------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A bridge with everything needed to serve it: homeostasis, affect scales, identity."""

    bridge: Bridge
    homeostasis: Homeostasis
    arousal_scale: float = 1.0
    probe: nn.Linear | None = None  # valence = tanh(probe(s)); None until trained
    base_model: str = ""
    base_digest: str | None = None
    trained: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_id: str = ""

    def __post_init__(self) -> None:
        if not self.checkpoint_id:
            self.checkpoint_id = compute_checkpoint_id(self._tensors())

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.bridge.state_dict().items()}
        if self.probe is not None:
            tensors["probe.weight"] = self.probe.weight.detach().to("cpu", torch.float32).contiguous()
            tensors["probe.bias"] = self.probe.bias.detach().to("cpu", torch.float32).contiguous()
        return tensors

    def manifest(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "checkpoint_id": self.checkpoint_id,
            "base_model": self.base_model,
            "base_digest": self.base_digest,
            "trained": self.trained,
            "bridge": self.bridge.config.to_dict(),
            "trainable_parameters": self.bridge.num_parameters(),
            "homeostasis": dataclasses.asdict(self.homeostasis),
            "arousal_scale": self.arousal_scale,
            "has_valence_probe": self.probe is not None,
            "metrics": self.metrics,
        }

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), str(directory / WEIGHTS_FILE))
        (directory / MANIFEST_FILE).write_text(json.dumps(self.manifest(), indent=2) + "\n")
        # safetensors writes 0600; a checkpoint shipped as package data must be readable by all.
        (directory / WEIGHTS_FILE).chmod(0o644)
        return directory


class CheckpointError(ValueError):
    pass


def compute_checkpoint_id(tensors: dict[str, torch.Tensor]) -> str:
    """Return a content digest (16 hex chars) of the tensors, independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def new_checkpoint(model_config: Any, *, seed: int = 0, base_model: str = "",
                   base_digest: str | None = None, **bridge_overrides: Any) -> Checkpoint:
    """Create an untrained checkpoint: random read-in and NCA, zero write-out.

    The same seed and torch version give the same weights, hence the same checkpoint id,
    so stored session states stay valid across restarts and replicas.
    """
    config = BridgeConfig.for_model(model_config, **bridge_overrides)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        bridge = Bridge(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return Checkpoint(bridge=bridge, homeostasis=Homeostasis(), base_model=base_model, base_digest=base_digest)


# Trained checkpoints shipped inside the package, one directory per base model name.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"


def checkpoint_for_model(model_name: str, model_config: Any, *, path: str | Path | None = None,
                         base_digest: str | None = None) -> tuple[Checkpoint, str]:
    """Return the checkpoint to serve with a base model, and where it came from.

    The checkpoint is the one at `path` when given, else the one shipped for `model_name`.
    Without either it is an untrained one, whose write-out is zero, so replies equal the base
    model's while states still move. It bridges the last 4 layers, or all of them in a model
    with fewer. The second value is "path", "shipped" or "untrained". Raises CheckpointError
    for an unreadable checkpoint or a model family the bridge does not support.
    """
    if path is not None:
        return load_checkpoint(path), "path"
    shipped = SHIPPED_WEIGHTS / model_name
    if (shipped / MANIFEST_FILE).exists():
        return load_checkpoint(shipped), "shipped"
    try:
        layers = min(BridgeConfig.bridged_layers, model_config.num_hidden_layers)
        checkpoint = new_checkpoint(model_config, base_model=model_name, base_digest=base_digest,
                                    bridged_layers=layers)
    except UnsupportedArchitecture as exc:
        raise CheckpointError(f"{exc}; serve a model of a supported family") from None
    return checkpoint, "untrained"


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Load a checkpoint directory (bridge.safetensors + manifest.json) and verify its id."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    weights_path = directory / WEIGHTS_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"bridge checkpoint {directory} has no {MANIFEST_FILE}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"bridge manifest {manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path} is not a {CHECKPOINT_FORMAT} v{CHECKPOINT_FORMAT_VERSION} manifest"
        )
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError:
        raise CheckpointError(f"bridge checkpoint {directory} has no {WEIGHTS_FILE}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"bridge weights {weights_path} cannot be read: {exc}") from None

    bridge = Bridge(BridgeConfig.from_dict(manifest["bridge"]))
    probe = None
    if "probe.weight" in tensors:
        probe = nn.Linear(bridge.config.nca.channels, 1)
        probe.load_state_dict({"weight": tensors.pop("probe.weight"), "bias": tensors.pop("probe.bias")})
    try:
        bridge.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"bridge weights {weights_path} do not match its manifest: {exc}") from None

    checkpoint = Checkpoint(
        bridge=bridge,
        homeostasis=Homeostasis(**manifest.get("homeostasis", {})),
        arousal_scale=float(manifest.get("arousal_scale", 1.0)),
        probe=probe,
        base_model=manifest.get("base_model", ""),
        base_digest=manifest.get("base_digest"),
        trained=bool(manifest.get("trained", False)),
        metrics=manifest.get("metrics", {}),
    )
    if checkpoint.checkpoint_id != manifest.get("checkpoint_id"):
        raise CheckpointError(
            f"bridge weights {weights_path} have id {checkpoint.checkpoint_id} but the manifest records "
            f"{manifest.get('checkpoint_id')}: the files are corrupt or from different checkpoints"
        )
    return checkpoint
