"""`senab compare`: the same prompt answered side by side by the base model, SENAB and the
adapters of a training run (LoRA, IA3), with the same sampling settings and seed.

Each column keeps its own conversation, so a prompt loop is a multi-turn chat per column.
The SENAB column also carries its session state from turn to turn, as the server does.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from senab.affect import read_affect
from senab.bridge import Checkpoint, attach_bridge
from senab.generation import GenerationRequest, Generator, SamplingParams
from senab.prompt import build_prompt

LABELS = {"base": "base", "senab": "SENAB", "lora": "LoRA r=32", "ia3": "IA3"}
ADAPTER_METHODS = ("lora", "ia3")
# `make train` writes runs/smollm2, and a bare `senab train` writes runs/default.
DEFAULT_RUN_DIRS = (Path("runs/smollm2"), Path("runs/default"))
MIN_COLUMN_WIDTH = 12
GAP = " | "


class AdapterError(ValueError):
    """An adapter directory of a training run that peft cannot load."""


def minimum_width(columns: int) -> int:
    """Return the narrowest output that still gives every column `MIN_COLUMN_WIDTH` characters."""
    return columns * MIN_COLUMN_WIDTH + len(GAP) * (columns - 1)


@dataclass
class Answer:
    """One column's reply to one prompt."""

    method: str
    label: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    tokens_per_second: float
    # The session state's affect after this turn, in the SENAB column only.
    state: dict[str, Any] | None = None


@dataclass
class _Column:
    method: str
    generator: Generator
    history: list[tuple[str, str]] = field(default_factory=list)


def find_adapters(run_dir: Path | None) -> tuple[Path | None, dict[str, Path]]:
    """Return the run directory used and the adapter directory of each method trained there.

    With `run_dir` None the default run directories are searched in order; the first one
    with an adapter wins.
    """
    candidates = [run_dir] if run_dir is not None else list(DEFAULT_RUN_DIRS)
    for candidate in candidates:
        adapters = {m: candidate / m / "final" / "adapter" for m in ADAPTER_METHODS
                    if (candidate / m / "final" / "adapter" / "adapter_config.json").exists()}
        if adapters:
            return candidate, adapters
    return run_dir, {}


class Comparison:
    """The columns of a comparison and their conversations.

    `load_model()` returns a fresh copy of the base model. The base and SENAB columns share
    one copy, because the bridge is off for rows without a session. Each adapter gets its own
    copy with the adapter merged into its weights.
    """

    def __init__(self, load_model: Callable[[], Any], tokenizer, checkpoint: Checkpoint,
                 adapters: dict[str, Path], sampling: SamplingParams) -> None:
        from senab.train import load_baseline

        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.sampling = sampling
        shared = load_model()
        self.handle = attach_bridge(shared, checkpoint.bridge)
        bridged = Generator(shared, tokenizer, self.handle)
        self.columns = [_Column("base", bridged), _Column("senab", bridged)]
        for method, adapter_dir in adapters.items():
            try:
                merged = load_baseline(load_model(), adapter_dir)
            except Exception as exc:  # peft raises KeyError, ValueError or JSON errors for broken adapters
                raise AdapterError(
                    f"the {LABELS[method]} adapter in {adapter_dir} cannot be loaded ({type(exc).__name__}: {exc}); "
                    "train it again with `make train`, or pass --run with another run directory") from None
            self.columns.append(_Column(method, Generator(merged, tokenizer)))
        self.set_point = checkpoint.bridge.set_point.detach().float().cpu().numpy()
        self.state = self.set_point.copy()
        self.turn = 0
        self._warm_up()

    @property
    def methods(self) -> list[str]:
        return [c.method for c in self.columns]

    def reset(self) -> None:
        """Start a new conversation in every column; SENAB's state returns to the set-point."""
        for column in self.columns:
            column.history.clear()
        self.state = self.set_point.copy()
        self.turn = 0

    def ask(self, prompt: str) -> list[Answer]:
        """Send `prompt` as the next user turn to every column and return their replies."""
        if not prompt.strip():
            raise ValueError("the prompt is empty; type a message")
        # Every column samples with the same settings and the same seed for a given turn.
        params = self.sampling if self.sampling.seed is None else dataclasses.replace(
            self.sampling, seed=self.sampling.seed + self.turn)
        answers = []
        for column in self.columns:
            messages = column.history + [("user", prompt)]
            built = build_prompt(self.tokenizer, messages)
            session = self.state if column.method == "senab" else None
            request = GenerationRequest(built.ids, params, session=session, turn_start=built.turn_start)
            started = time.perf_counter()
            output = column.generator.generate([request])[0]
            latency = time.perf_counter() - started
            answer = Answer(method=column.method, label=LABELS[column.method], text=output.text.strip(),
                            finish_reason=output.finish_reason, prompt_tokens=output.prompt_tokens,
                            completion_tokens=output.completion_tokens, latency_s=latency,
                            tokens_per_second=output.completion_tokens / latency if latency > 0 else 0.0)
            if column.method == "senab" and output.readout is not None:
                self.state = self.checkpoint.homeostasis.update(self.state, output.readout, self.set_point)
                affect = read_affect(self.state, self.set_point, arousal_scale=self.checkpoint.arousal_scale,
                                     probe=self.checkpoint.probe)
                answer.state = {"turn": self.turn + 1, **dataclasses.asdict(affect)}
            column.history = messages + [("assistant", output.text)]
            answers.append(answer)
        self.turn += 1
        return answers

    def _warm_up(self) -> None:
        """Run one short generation per column so the first one does not pay one-time costs."""
        built = build_prompt(self.tokenizer, [("user", "Hello")])
        params = SamplingParams(max_tokens=2, temperature=0)
        for column in self.columns:
            session = self.set_point if column.method == "senab" else None
            column.generator.generate([GenerationRequest(built.ids, params, session=session,
                                                         turn_start=built.turn_start)])


def answers_json(prompt: str, turn: int, answers: list[Answer], header: dict[str, Any]) -> str:
    """Return one JSON object for a prompt: the settings, then one entry per column."""
    return json.dumps({**header, "turn": turn, "prompt": prompt,
                       "columns": [dataclasses.asdict(a) for a in answers]}, ensure_ascii=False)


def render_columns(answers: list[Answer], width: int = 100) -> str:
    """Return the replies laid out side by side in at most `width` terminal columns per line.

    Widths count terminal columns, so a CJK character or an emoji takes two. Control
    characters are shown escaped.
    """
    column_width = max(MIN_COLUMN_WIDTH, (width - len(GAP) * (len(answers) - 1)) // len(answers))
    blocks = [_block(a, column_width) for a in answers]
    rule = "-+-".join("-" * column_width for _ in answers)
    lines = []
    for section in range(3):  # header, reply, numbers
        height = max(len(block[section]) for block in blocks)
        for row in range(height):
            cells = [block[section][row] if row < len(block[section]) else "" for block in blocks]
            lines.append(GAP.join(cell + " " * (column_width - display_width(cell)) for cell in cells).rstrip())
        if section < 2:
            lines.append(rule)
    return "\n".join(lines)


def display_width(text: str) -> int:
    """Return how many terminal columns `text` takes: wide East Asian characters take two,
    combining marks none."""
    width = 0
    for c in text:
        if unicodedata.combining(c):
            continue
        width += 2 if unicodedata.east_asian_width(c) in "WF" else 1
    return width


def printable(text: str) -> str:
    """Return `text` with control characters other than newlines escaped, so a reply or a
    prompt cannot move the cursor or change the terminal's colours."""
    return "".join(c if c == "\n" or unicodedata.category(c) != "Cc" else
                   " " if c == "\t" else f"\\x{ord(c):02x}" for c in text)


def wrap(text: str, width: int) -> list[str]:
    """Wrap `text` to `width` terminal columns, keeping its line breaks."""
    lines = []
    for paragraph in printable(text).splitlines() or [""]:
        for line in textwrap.wrap(paragraph, width, break_long_words=True, replace_whitespace=False) or [""]:
            # textwrap counts characters; split again where wide characters overflow.
            while display_width(line) > width:
                cut = 1
                while display_width(line[:cut + 1]) <= width:
                    cut += 1
                lines.append(line[:cut])
                line = line[cut:]
            lines.append(line)
    return lines


def _block(answer: Answer, width: int) -> tuple[list[str], list[str], list[str]]:
    facts = [f"{answer.latency_s:.2f} s, {answer.completion_tokens} tokens",
             f"{answer.tokens_per_second:.1f} tokens/s, {answer.finish_reason}"]
    if answer.state is not None:
        valence = "n/a" if answer.state["valence"] is None else f"{answer.state['valence']:+.2f}"
        facts.append(f"valence {valence}, arousal {answer.state['arousal']:.2f}, "
                     f"distance {answer.state['distance']:.2f}")
    numbers = [line for fact in facts for line in wrap(fact, width)]
    return [answer.label[:width]], wrap(answer.text or "(empty reply)", width), numbers


def describe_settings(sampling: SamplingParams) -> str:
    settings = f"temperature {sampling.temperature:g}"
    if not sampling.greedy:
        settings += f", top_p {sampling.top_p:g}, seed {sampling.seed}"
    return settings + f", max_tokens {sampling.max_tokens}"
