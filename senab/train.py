"""Train the SENAB bridge, or a LoRA or IA3 baseline, on chitchat windows.

SENAB is trained with the homeostasis law inside the loop. For each window of T turns the
session starts at the set-point s*; turn k runs over the conversation up to the end of its
reply with the current state s_k (as the server does), its readout n_k moves the state,

    s_{k+1} = s_k + alpha (n_k - s_k) + beta (s* - s_k),

and the loss is the reply tokens' cross-entropy plus `valence_weight` times the squared
error between the probe's valence tanh(a . s_{k+1} + b) and the VADER score of turn k's user
message, plus `arousal_weight` times the squared error between ||s_{k+1} - s*|| /
`arousal_distance` and |VADER|, plus `set_point_weight` times the squared distance from s*
to the (detached) readouts. Gradients flow through the whole window (T turns). The lower
layers run once per window and are cached for later epochs (`senab.stack`). With
`state_batch` > 0, each step also runs the state chain alone (no language-model loss) on
windows from a separate pool, so the probe trains on more labelled turns at little cost.

The baselines train on the same windows, steps, batch size and sequence length with a plain
forward pass whose labels are the same reply tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from senab.bridge import BridgeState, Checkpoint, attach_bridge, freeze_base_model, new_checkpoint
from senab.data import Window
from senab.stack import lower_hidden, token_logits, upper_hidden
from senab.state import Homeostasis

logger = logging.getLogger(__name__)

Method = Literal["senab", "lora", "ia3"]
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Hyperparameters of one training run; stored in the checkpoint manifest."""

    method: Method = "senab"
    steps: int = 400
    batch_size: int = 2
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    valence_weight: float = 10.0
    # Pulls the set-point toward the mean turn readout (the readout side is not moved), so
    # an ordinary turn leaves the state near rest and the distance measures provocation.
    set_point_weight: float = 1.0
    # Makes the distance ||s - s*|| after a turn track the intensity |VADER| of its user
    # message, reaching `arousal_distance` at |VADER| = 1: ordinary turns leave the state
    # near rest, so a provocation is far from it and the distance can relax back.
    arousal_weight: float = 3.0
    arousal_distance: float = 2.0
    # Turns per window whose replies carry the language-model loss, counted from the last;
    # 0 means all. The state chain and the valence loss always cover every turn.
    lm_loss_turns: int = 0
    # Extra windows per step, from the separate state pool, that feed only the state losses
    # (valence, arousal, set-point): the probe needs more labelled turns than the language
    # loss needs windows, and the state chain costs only the automaton.
    state_batch: int = 0
    alpha: float = 0.5
    beta: float = 0.2
    turns_per_window: int = 4
    max_length: int = 512
    seed: int = 0
    data_seed: int = 0
    checkpoint_every: int = 100
    lora_rank: int = 32

    def __post_init__(self) -> None:
        if self.method not in ("senab", "lora", "ia3"):
            raise ValueError(f"method must be senab, lora or ia3, got {self.method!r}")
        for name in ("steps", "batch_size", "turns_per_window", "max_length", "checkpoint_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("valence_weight", "set_point_weight", "arousal_weight", "lm_loss_turns", "state_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must not be negative, got {getattr(self, name)}")
        if not self.arousal_distance > 0:
            raise ValueError(f"TrainConfig.arousal_distance must be positive, got {self.arousal_distance}")
        Homeostasis(self.alpha, self.beta)


@dataclass
class StepRecord:
    step: int
    loss: float
    lm_loss: float
    valence_loss: float
    seconds: float
    tokens: int


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[StepRecord] = field(default_factory=list)
    trainable_parameters: int = 0

    @property
    def seconds_per_step(self) -> float:
        times = [r.seconds for r in self.history]
        return float(np.mean(times)) if times else math.nan

    @property
    def total_seconds(self) -> float:
        return float(sum(r.seconds for r in self.history))


def batch_schedule(num_windows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Return the window indices of every step: a seeded reshuffle per epoch."""
    schedule: list[list[int]] = []
    order: list[int] = []
    epoch = 0
    while len(schedule) < steps:
        if len(order) < batch_size:
            permutation = list(range(num_windows))
            random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
            order += permutation
            epoch += 1
        schedule.append(order[:batch_size])
        order = order[batch_size:]
    return schedule


class LowerCache:
    """The input of layer L-m for each window, computed once (no autograd) and kept."""

    def __init__(self, model, first_bridged_layer: int) -> None:
        self.model = model
        self.first = first_bridged_layer
        self._hidden: dict[int, torch.Tensor] = {}

    def get(self, index: int, window: Window) -> torch.Tensor:
        hidden = self._hidden.get(index)
        if hidden is None:
            hidden = lower_hidden(self.model, window.ids, self.first)
            self._hidden[index] = hidden
        return hidden


@dataclass
class WindowPass:
    """Losses, states and readouts of one SENAB pass over a window."""

    lm_loss: torch.Tensor  # mean cross-entropy over the window's reply tokens
    valence_loss: torch.Tensor
    set_point_loss: torch.Tensor  # mean squared distance of s* to the detached readouts
    arousal_loss: torch.Tensor
    tokens: int
    states: list[torch.Tensor]  # state after each turn (C,)
    readouts: list[torch.Tensor]
    valences: list[torch.Tensor]
    states_before: list[torch.Tensor]  # state each turn ran with


def turn_readout(bridge, hidden: torch.Tensor, state: torch.Tensor, user_start: int, end: int) -> torch.Tensor:
    """Return the readout of one turn: the mean lattice over positions user_start..end-1 (C,).

    This is the lattice the read-in hook grows during the turn's forward pass, computed
    without the decoder layers: it depends only on the cached input of layer L-m and the state.
    A lattice row depends on at most `receptive_field` earlier rows, so the growth starts
    there instead of at position 0. The result is the same, and a turn costs its own length.
    """
    start = max(0, user_start - bridge.cell.config.receptive_field)
    x0 = bridge.seed_lattice(hidden[:, start:end], state.unsqueeze(0))
    lattice, _ = bridge.cell.grow(x0)
    return lattice[0, user_start - start:].mean(0)


def state_losses(checkpoint: Checkpoint, probe: nn.Linear | None, window: Window, hidden: torch.Tensor,
                 homeostasis: Homeostasis, arousal_distance: float,
                 start_state: torch.Tensor | None = None) -> WindowPass:
    """Run the state chain of `window` (readouts, homeostasis, valence) and its losses.

    The language-model fields of the result are zero: `senab_window_pass` adds them.
    """
    bridge = checkpoint.bridge
    set_point = bridge.set_point
    state = set_point if start_state is None else start_state
    states_before, states, readouts, valences = [], [], [], []
    valence_sum = arousal_sum = hidden.new_zeros(())

    for turn in window.turns:
        states_before.append(state)
        readout = turn_readout(bridge, hidden, state, turn.user_start, turn.reply_end)
        state = state + homeostasis.alpha * (readout - state) + homeostasis.beta * (set_point - state)
        valence = torch.tanh(probe(state)).squeeze(-1) if probe is not None else torch.full_like(state[0], math.nan)
        if probe is not None:
            valence_sum = valence_sum + (valence - turn.valence) ** 2
        # The epsilon keeps the gradient finite at the set-point itself.
        distance = torch.sqrt((state - set_point).pow(2).sum() + 1e-8)
        arousal_sum = arousal_sum + (distance / arousal_distance - abs(turn.valence)) ** 2
        states.append(state)
        readouts.append(readout)
        valences.append(valence)

    turns = len(window.turns)
    set_point_loss = torch.stack([(set_point - r.detach()).pow(2).mean() for r in readouts]).mean()
    zero = hidden.new_zeros(())
    return WindowPass(lm_loss=zero, valence_loss=valence_sum / turns, set_point_loss=set_point_loss,
                      arousal_loss=arousal_sum / turns, tokens=0, states=states, readouts=readouts,
                      valences=valences, states_before=states_before)


def senab_window_pass(model, handle, checkpoint: Checkpoint, probe: nn.Linear, window: Window,
                      hidden: torch.Tensor, homeostasis: Homeostasis, *, lm_loss_turns: int | None = None,
                      start_state: torch.Tensor | None = None,
                      arousal_distance: float = TrainConfig.arousal_distance) -> WindowPass:
    """Run the turns of `window` with the evolving session state, as the server would.

    The state chain (readouts, homeostasis, valence) covers every turn and costs only the
    automaton. The language-model loss runs the upper layers for the last `lm_loss_turns`
    turns (all when None), each over the whole conversation up to the end of its reply.
    """
    result = state_losses(checkpoint, probe, window, hidden, homeostasis, arousal_distance, start_state)
    first = checkpoint.bridge.config.first_layer
    ids = torch.as_tensor(window.ids, device=hidden.device)
    loss_sum = hidden.new_zeros(())
    tokens = 0
    count = len(window.turns) if lm_loss_turns is None else min(lm_loss_turns, len(window.turns))
    for k in range(len(window.turns) - count, len(window.turns)):
        turn = window.turns[k]
        bridge_state = BridgeState(checkpoint.bridge, result.states_before[k].unsqueeze(0), [turn.user_start])
        positions = torch.arange(turn.reply_start - 1, turn.reply_end - 1, device=hidden.device)
        with handle.activate(bridge_state):
            final = upper_hidden(model, hidden[:, :turn.reply_end], first, rows=positions)
        logits = token_logits(model, final).float()
        loss_sum = loss_sum + F.cross_entropy(logits, ids[positions + 1], reduction="sum")
        tokens += len(positions)
    result.lm_loss = loss_sum / max(tokens, 1)
    result.tokens = tokens
    return result


def labelled_batch(windows: list[Window], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 except reply tokens) for a baseline."""
    width = max(len(w.ids) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, window in enumerate(windows):
        input_ids[row, :len(window.ids)] = torch.tensor(window.ids)
        attention_mask[row, :len(window.ids)] = 1
        for position in window.loss_positions():
            labels[row, position] = window.ids[position]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def attach_baseline(model, method: Method, rank: int):
    """Wrap `model` with a peft LoRA (k_proj, v_proj of every layer) or IA3 adapter."""
    from peft import IA3Config, LoraConfig, get_peft_model

    if method == "lora":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["k_proj", "v_proj"],
                            task_type="CAUSAL_LM")
    else:
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                           task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_baseline(model, adapter_dir: str | Path):
    """Return `model` with the peft adapter saved in `adapter_dir` merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


class Trainer:
    """One training run: its model, parameters, optimizer, schedule and checkpoints."""

    def __init__(self, model, tokenizer, windows: list[Window], config: TrainConfig, out_dir: str | Path, *,
                 state_windows: list[Window] | None = None, base_model: str = "", base_digest: str | None = None,
                 progress: bool = True) -> None:
        if not windows:
            raise ValueError("no training windows: check the data split and max_length")
        state_windows = state_windows or []
        if config.method == "senab" and config.state_batch and not state_windows:
            raise ValueError(f"TrainConfig.state_batch is {config.state_batch} but there are no state windows; "
                             "pass state_windows or set state_batch to 0")
        self.model = model
        self.tokenizer = tokenizer
        self.windows = windows
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.homeostasis = Homeostasis(config.alpha, config.beta)
        self.schedule = batch_schedule(len(windows), config.steps, config.batch_size, config.data_seed)
        self.state_windows = state_windows
        self.state_schedule = (batch_schedule(len(state_windows), config.steps, config.state_batch,
                                              config.data_seed + 1) if config.method == "senab" and config.state_batch
                               else [[] for _ in range(config.steps)])
        torch.manual_seed(config.seed)

        if config.method == "senab":
            self.checkpoint = new_checkpoint(model.config, seed=config.seed, base_model=base_model,
                                             base_digest=base_digest)
            self.checkpoint.homeostasis = self.homeostasis
            self.probe = nn.Linear(self.checkpoint.bridge.config.nca.channels, 1)
            self.handle = attach_bridge(model, self.checkpoint.bridge)
            freeze_base_model(model, self.checkpoint.bridge)
            self.cache = LowerCache(model, self.checkpoint.bridge.config.first_layer)
            self.state_cache = LowerCache(model, self.checkpoint.bridge.config.first_layer)
            parameters = list(self.checkpoint.bridge.parameters()) + list(self.probe.parameters())
            self.trainable = self.checkpoint.bridge.num_parameters()
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = attach_baseline(model, config.method, config.lora_rank)
            parameters = [p for p in self.model.parameters() if p.requires_grad]
            self.trainable = sum(p.numel() for p in parameters)
        self.parameters = parameters
        self.optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.result = TrainResult(config=config, trainable_parameters=self.trainable)
        self.step = 0

    # ------------------------------------------------------------------ steps

    def _senab_loss(self, result: WindowPass) -> torch.Tensor:
        c = self.config
        return (result.lm_loss + c.valence_weight * result.valence_loss + c.set_point_weight * result.set_point_loss
                + c.arousal_weight * result.arousal_loss)

    def _senab_step(self, batch: list[int]) -> StepRecord:
        """LM and state losses on `batch`, plus state losses on this step's state windows.

        Each window's loss is scaled by 1 / len(batch): the state windows add to the state
        losses' weight without changing the language-model loss.
        """
        lm_total = valence_total = 0.0
        tokens = 0
        for index in batch:
            window = self.windows[index]
            result = senab_window_pass(self.model, self.handle, self.checkpoint, self.probe, window,
                                       self.cache.get(index, window), self.homeostasis,
                                       lm_loss_turns=self.config.lm_loss_turns or None,
                                       arousal_distance=self.config.arousal_distance)
            (self._senab_loss(result) / len(batch)).backward()
            lm_total += result.lm_loss.item() / len(batch)
            valence_total += result.valence_loss.item() / len(batch)
            tokens += len(window.ids)
        for index in self.state_schedule[self.step]:
            window = self.state_windows[index]
            result = state_losses(self.checkpoint, self.probe, window, self.state_cache.get(index, window),
                                  self.homeostasis, self.config.arousal_distance)
            (self._senab_loss(result) / len(batch)).backward()
        return StepRecord(step=self.step, loss=lm_total + self.config.valence_weight * valence_total,
                          lm_loss=lm_total, valence_loss=valence_total, seconds=0.0, tokens=tokens)

    def _baseline_step(self, batch: list[int]) -> StepRecord:
        windows = [self.windows[i] for i in batch]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inputs = labelled_batch(windows, pad_id)
        loss = self.model(**inputs).loss
        loss.backward()
        return StepRecord(step=self.step, loss=loss.item(), lm_loss=loss.item(), valence_loss=0.0, seconds=0.0,
                          tokens=sum(len(w.ids) for w in windows))

    def train(self, until: int | None = None) -> TrainResult:
        """Run the remaining steps (up to step `until`), saving a resumable checkpoint every
        `checkpoint_every` steps."""
        from tqdm import tqdm

        self.model.train(False)  # no dropout in SmolLM2; eval mode keeps runs deterministic
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not self.progress,
                   desc=f"train {self.config.method}", unit="step")
        last = self.config.steps if until is None else min(until, self.config.steps)
        while self.step < last:
            started = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            batch = self.schedule[self.step]
            record = self._senab_step(batch) if self.config.method == "senab" else self._baseline_step(batch)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
            self.optimizer.step()
            record.seconds = time.perf_counter() - started
            self.result.history.append(record)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.3f}", tok_s=f"{record.tokens / record.seconds:.0f}")
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save_state(self.out_dir / f"step-{self.step:06d}")
        bar.close()
        return self.result

    # ------------------------------------------------------------ checkpoints

    def save_state(self, directory: Path) -> Path:
        """Save everything needed to resume: weights, optimizer, step, RNG and history."""
        directory.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.random.get_rng_state(),
            "history": [dataclasses.asdict(r) for r in self.result.history],
            "trainable": {name: p.detach().clone() for name, p in self._named_trainable()},
        }
        torch.save(state, directory / STATE_FILE)
        if self.config.method == "senab":
            self.servable_checkpoint().save(directory)
        else:
            self.model.save_pretrained(directory / "adapter")
        logger.info("saved %s training state at step %d to %s", self.config.method, self.step, directory)
        return directory

    def resume(self, directory: str | Path) -> None:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=False)
        if state["config"] != dataclasses.asdict(self.config):
            raise ValueError(f"checkpoint {directory} was made with another training configuration; "
                             "resume with the same settings or start a new run")
        with torch.no_grad():
            for name, p in self._named_trainable():
                p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.random.set_rng_state(state["torch_rng"])
        self.result.history = [StepRecord(**r) for r in state["history"]]
        self.step = state["step"]
        logger.info("resumed %s training from %s at step %d", self.config.method, directory, self.step)

    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        if self.config.method == "senab":
            named = [(f"bridge.{n}", p) for n, p in self.checkpoint.bridge.named_parameters()]
            return named + [(f"probe.{n}", p) for n, p in self.probe.named_parameters()]
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def servable_checkpoint(self, **manifest_metrics: Any) -> Checkpoint:
        """Return the bridge as the server loads it, with its probe and homeostasis settings."""
        checkpoint = self.checkpoint
        return Checkpoint(bridge=checkpoint.bridge, homeostasis=self.homeostasis,
                          arousal_scale=checkpoint.arousal_scale, probe=self.probe,
                          base_model=checkpoint.base_model, base_digest=checkpoint.base_digest, trained=True,
                          metrics={"train": {"steps": self.step, "config": dataclasses.asdict(self.config)},
                                   **manifest_metrics})


def latest_step_dir(out_dir: str | Path) -> Path | None:
    steps = sorted(Path(out_dir).glob("step-*"))
    steps = [s for s in steps if (s / STATE_FILE).exists()]
    return steps[-1] if steps else None


def write_history(result: TrainResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps({
        "config": dataclasses.asdict(result.config),
        "trainable_parameters": result.trainable_parameters,
        "seconds_per_step": result.seconds_per_step,
        "total_seconds": result.total_seconds,
        "history": [dataclasses.asdict(r) for r in result.history],
    }, indent=1) + "\n")


# ------------------------------------------------------------------ after training


def pearson(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


@torch.no_grad()
def state_chain(checkpoint: Checkpoint, probe: nn.Linear | None, window: Window, hidden: torch.Tensor,
                homeostasis: Homeostasis) -> tuple[list[np.ndarray], list[float]]:
    """Return the state after each turn of `window` and its valence (NaN without a probe)."""
    bridge = checkpoint.bridge
    state = bridge.set_point.detach()
    states, valences = [], []
    for turn in window.turns:
        readout = turn_readout(bridge, hidden, state, turn.user_start, turn.reply_end)
        state = state + homeostasis.alpha * (readout - state) + homeostasis.beta * (bridge.set_point - state)
        states.append(state.cpu().numpy().astype(np.float32))
        valences.append(float(torch.tanh(probe(state)).item()) if probe is not None else math.nan)
    return states, valences


def select_homeostasis(checkpoint: Checkpoint, probe: nn.Linear, windows: list[Window], cache: LowerCache,
                       grid: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8)) -> tuple[Homeostasis, list[dict]]:
    """Choose alpha and beta on validation windows by valence tracking (Pearson r).

    Every (alpha, beta) with alpha + beta <= 1 and beta > 0 is scored, so a state always has
    some pull back to the set-point.
    """
    labels = [turn.valence for window in windows for turn in window.turns]
    scores = []
    for alpha in grid:
        for beta in (0.1, 0.2, 0.3):
            if alpha + beta > 1:
                continue
            law = Homeostasis(alpha, beta)
            predicted = [v for i, w in enumerate(windows)
                         for v in state_chain(checkpoint, probe, w, cache.get(i, w), law)[1]]
            scores.append({"alpha": alpha, "beta": beta, "valence_r": pearson(predicted, labels)})
    best = max(scores, key=lambda row: -1.0 if math.isnan(row["valence_r"]) else row["valence_r"])
    return Homeostasis(best["alpha"], best["beta"]), scores


def arousal_scale(checkpoint: Checkpoint, windows: list[Window], cache: LowerCache, law: Homeostasis) -> float:
    """Return the 90th percentile of distances to the set-point on `windows` (arousal tanh(1) there)."""
    set_point = checkpoint.bridge.set_point.detach().cpu().numpy()
    distances = [float(np.linalg.norm(s - set_point)) for i, w in enumerate(windows)
                 for s in state_chain(checkpoint, None, w, cache.get(i, w), law)[0]]
    return max(float(np.percentile(distances, 90)), 1e-3) if distances else 1.0
