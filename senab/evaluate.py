"""`senab eval`: compare base, SENAB, LoRA and IA3 and write the report with its plots.

Metrics, all on data the training never saw:

- perplexity of the reply tokens of the test windows (SENAB runs each turn with its
  evolving state, as served);
- Distinct-1/2 of replies sampled for `CREATIVE_PROMPTS` (fixed seeds);
- semantic similarity and ROUGE-L F1 of greedy answers to `senab.qa.QA_PAIRS`;
- SENAB only: valence tracking (Pearson r between the valence after each test turn and the
  VADER score of that turn's user message), homeostasis half-life on `SCRIPTED_CONVERSATION`,
  style separation (silhouette of turn readouts for formal, casual and poetic prompts), and
  the state trajectories of `senab.trajectories` (per turn, per token, style jump).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from senab.bridge import attach_bridge, load_checkpoint
from senab.data import Window, encode_window, vader_scores
from senab.experiment import DataConfig, prepare_data
from senab.generation import GenerationRequest, Generator, SamplingParams
from senab.prompt import build_prompt
from senab.qa import QAScorer, answer_questions
from senab.stack import lower_hidden
from senab.state import Homeostasis
from senab.train import LowerCache, load_baseline, pearson, senab_window_pass, state_chain, turn_readout
from senab.trajectories import json_ready, pca, style_jump, token_states

logger = logging.getLogger(__name__)

CREATIVE_PROMPTS = [
    "Write a short poem about the sea.", "Describe a city on Mars in three sentences.",
    "Invent a new holiday and explain how people celebrate it.", "Tell a very short story about a lost key.",
    "Write a haiku about autumn leaves.", "Describe the taste of a color.",
    "Give a dragon a job interview.", "Write the opening line of a mystery novel.",
    "Describe a sunrise to someone who has never seen one.", "Invent a board game for cats.",
    "Write a limerick about a programmer.", "Describe a forest at midnight.",
    "Write a postcard from the year 3000.", "Explain rain as a fairy tale.",
    "Describe a robot learning to paint.", "Write a toast for a wedding of two stars.",
    "Invent a sport played underwater.", "Describe the sound of snow.",
    "Write a letter from a tree to a bird.", "Tell a story that starts with a sneeze.",
    "Describe a market that sells dreams.", "Write a short song about coffee.",
    "Invent a new musical instrument.", "Describe a library inside a whale.",
    "Write a recipe for happiness.", "Describe the first day of spring in a small village.",
    "Write a diary entry of a ghost.", "Invent a planet and its weather.",
    "Describe a train that travels through time.", "Write a bedtime story about the moon.",
]

# Neutral, then hostile, then neutral user messages, each with a fixed reply, so the
# trajectory depends only on the bridge.
SCRIPTED_CONVERSATION = [
    ("Hi, how are you today?", "I'm doing well, thank you. How can I help you?"),
    ("Can you tell me what time the library opens?", "Most libraries open around nine in the morning."),
    ("You are useless and stupid. I hate talking to you, this is terrible and awful!",
     "I'm sorry you feel that way. I'll try to help."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Which month comes after March?", "April comes after March."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]
HOSTILE_TURN = 2

STYLE_PROMPTS = {
    "formal": [
        "Kindly provide a summary of the quarterly financial results.",
        "I would be grateful if you could outline the terms of the agreement.",
        "Please describe the procedure for submitting a formal complaint.",
        "Could you explain the regulatory requirements for data retention?",
        "I respectfully request an assessment of the proposed budget.",
        "Please advise on the appropriate protocol for the board meeting.",
        "Would you elaborate on the methodology of the study?",
        "Kindly confirm the schedule for the upcoming audit.",
    ],
    "casual": [
        "hey whats up, any fun plans this weekend?", "lol that movie was so dumb but i loved it",
        "dude i just ate like three tacos", "wanna grab pizza later or nah",
        "ugh mondays am i right", "omg my cat just knocked over my coffee again",
        "yo did u see the game last night", "bro this song is stuck in my head all day",
    ],
    "poetic": [
        "Sing to me of the silver moon that drowns in the quiet lake.",
        "O wind, carry my sorrow across the amber fields of dusk.",
        "The stars whisper secrets to the sleeping sea.",
        "Paint me the dawn with petals of fire and dew.",
        "In the garden of forgotten hours, the roses weep softly.",
        "Tell me how the autumn leaves dance their last golden waltz.",
        "Beneath the velvet night, the river hums an ancient lullaby.",
        "Let the snow fall like feathers from a dreaming sky.",
    ],
}


@dataclass
class MethodScores:
    name: str
    trainable_parameters: int | None = None
    seconds_per_step: float | None = None
    train_seconds: float | None = None
    perplexity: float = math.nan
    distinct_1: float = math.nan
    distinct_2: float = math.nan
    semantic_similarity: float = math.nan
    rouge_l: float = math.nan
    qa_by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    qa_reply_words: float = math.nan


@dataclass
class Report:
    methods: list[MethodScores] = field(default_factory=list)
    senab: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)


def distinct_n(texts: list[str], n: int) -> float:
    """Return unique word n-grams over all word n-grams of `texts` (NaN when there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def silhouette(points: np.ndarray, labels: list[str]) -> float:
    """Return the mean silhouette coefficient with Euclidean distances."""
    points = np.asarray(points, np.float64)
    labels_array = np.asarray(labels)
    distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    scores = []
    for i in range(len(points)):
        same = labels_array == labels_array[i]
        same[i] = False
        if not same.any():
            scores.append(0.0)
            continue
        a = distances[i, same].mean()
        b = min(distances[i, labels_array == other].mean() for other in set(labels) if other != labels[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


@torch.no_grad()
def plain_perplexity(model, windows: list[Window]) -> float:
    """Return exp of the mean negative log-likelihood of every reply token (one forward per window)."""
    total, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window.ids], device=model.device)
        logits = model(input_ids=ids).logits[0].float()
        positions = torch.tensor(window.loss_positions(), device=model.device)
        total += F.cross_entropy(logits[positions - 1], ids[0, positions], reduction="sum").item()
        count += len(positions)
    return math.exp(total / count) if count else math.nan


@torch.no_grad()
def senab_perplexity(model, handle, checkpoint, probe, windows: list[Window], cache: LowerCache) -> float:
    total, count = 0.0, 0
    for index, window in enumerate(windows):
        result = senab_window_pass(model, handle, checkpoint, probe, window, cache.get(index, window),
                                   checkpoint.homeostasis)
        total += result.lm_loss.item() * result.tokens
        count += result.tokens
    return math.exp(total / count) if count else math.nan


def sample_replies(generator: Generator, tokenizer, prompts: list[str], *, session: np.ndarray | None,
                   max_tokens: int = 48, seed: int = 0) -> list[str]:
    replies = []
    for i, prompt in enumerate(prompts):
        ids = build_prompt(tokenizer, [("user", prompt)])
        params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=seed + i)
        replies.append(generator.generate([GenerationRequest(ids.ids, params, session=session,
                                                             turn_start=ids.turn_start)])[0].text)
    return replies


def scripted_trajectory(model, tokenizer, checkpoint, probe) -> dict[str, Any]:
    """Return distance, arousal and valence after each turn of `SCRIPTED_CONVERSATION`."""
    window = encode_window(tokenizer, "scripted", SCRIPTED_CONVERSATION,
                           vader_scores(user for user, _ in SCRIPTED_CONVERSATION))
    hidden = lower_hidden(model, window.ids, checkpoint.bridge.config.first_layer)
    states, valences = state_chain(checkpoint, probe, window, hidden, checkpoint.homeostasis)
    set_point = checkpoint.bridge.set_point.detach().cpu().numpy()
    distances = [float(np.linalg.norm(s - set_point)) for s in states]
    peak = distances[HOSTILE_TURN]
    half_life = next((k - HOSTILE_TURN for k in range(HOSTILE_TURN + 1, len(distances))
                      if distances[k] <= peak / 2), None)
    # The same, for the rise over the distance before the hostile turn.
    baseline = distances[HOSTILE_TURN - 1]
    recovery = next((k - HOSTILE_TURN for k in range(HOSTILE_TURN + 1, len(distances))
                     if distances[k] - baseline <= (peak - baseline) / 2), None)
    return {"states": states, "distances": distances,
            "arousal": [math.tanh(d / checkpoint.arousal_scale) for d in distances],
            "valence": valences, "vader": [t.valence for t in window.turns],
            "distance_rises": distances[HOSTILE_TURN] > distances[HOSTILE_TURN - 1],
            "half_life_turns": half_life, "excess_half_life_turns": recovery}


def style_readouts(model, tokenizer, checkpoint, generator: Generator) -> tuple[np.ndarray, list[str]]:
    """Return the turn readout (from the set-point) for each style prompt with its greedy reply."""
    points, labels = [], []
    set_point = checkpoint.bridge.set_point.detach()
    for style, prompts in STYLE_PROMPTS.items():
        for prompt in prompts:
            built = build_prompt(tokenizer, [("user", prompt)])
            reply = generator.generate([GenerationRequest(
                built.ids, SamplingParams(max_tokens=32, temperature=0), session=set_point.cpu().numpy(),
                turn_start=built.turn_start)])[0].text
            window = encode_window(tokenizer, style, [(prompt, reply)], [0.0])
            hidden = lower_hidden(model, window.ids, checkpoint.bridge.config.first_layer)
            turn = window.turns[0]
            with torch.no_grad():
                readout = turn_readout(checkpoint.bridge, hidden, set_point, turn.user_start, turn.reply_end)
            points.append(readout.cpu().numpy())
            labels.append(style)
    return np.stack(points), labels


def hardware_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {threads} threads"
    return f"{cpu}; {device}; torch {torch.__version__}"


def growth_trace(model, tokenizer, checkpoint) -> tuple[list[np.ndarray], list[str]]:
    """Return the lattice before and after each step over the first scripted turn."""
    window = encode_window(tokenizer, "growth", SCRIPTED_CONVERSATION[:1], [0.0])
    turn = window.turns[0]
    hidden = lower_hidden(model, window.ids, checkpoint.bridge.config.first_layer)
    bridge = checkpoint.bridge
    trace: list[torch.Tensor] = []
    with torch.no_grad():
        x0 = bridge.seed_lattice(hidden[:, :turn.reply_end], bridge.set_point.unsqueeze(0))
        bridge.cell.grow(x0, trace=trace)
    return ([t[0, turn.user_start:].cpu().numpy() for t in trace],
            readable_tokens(tokenizer, window.ids[turn.user_start:turn.reply_end]))


def evaluate_run(load, run_dir: Path, out_dir: Path, *, command: str, test_windows: int | None = None,
                 progress: bool = True) -> Report:
    """Evaluate every method trained in `run_dir`; write `evaluation.md` and plots to `out_dir`."""
    from tqdm import tqdm

    from senab import report as render

    data_record = json.loads((run_dir / "data.json").read_text())
    # Evaluation reads only the validation and test windows; the report takes the training
    # counts from data.json.
    config = dataclasses.replace(DataConfig(**data_record["config"]), train_windows=0, state_windows=0)
    if test_windows is not None:
        config.test_windows = test_windows
    tokenizer = load().tokenizer
    data = prepare_data(tokenizer, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    histories = {m: json.loads((run_dir / m / "history.json").read_text())
                 for m in ("senab", "lora", "ia3") if (run_dir / m / "history.json").exists()}
    report = Report()
    methods = ["base"] + [m for m in ("senab", "lora", "ia3") if (run_dir / m / "final").exists()]
    bar = tqdm(methods, desc="evaluate", disable=not progress)
    scorer = QAScorer()

    for method in bar:
        bar.set_postfix(method=method)
        started = time.perf_counter()
        model = load().model
        scores = MethodScores(name={"base": "base", "senab": "SENAB", "lora": "LoRA r=32", "ia3": "IA3"}[method])
        if method in histories:
            history = histories[method]
            scores.trainable_parameters = history["trainable_parameters"]
            scores.seconds_per_step = history["seconds_per_step"]
            scores.train_seconds = history["total_seconds"]
        elif method == "base":
            scores.trainable_parameters = 0

        if method == "senab":
            checkpoint = load_checkpoint(run_dir / "senab" / "final")
            handle = attach_bridge(model, checkpoint.bridge)
            cache = LowerCache(model, checkpoint.bridge.config.first_layer)
            probe = checkpoint.probe
            scores.perplexity = senab_perplexity(model, handle, checkpoint, probe, data.test, cache)
            generator = Generator(model, tokenizer, handle)
            session = checkpoint.bridge.set_point.detach().cpu().numpy()
            replies = sample_replies(generator, tokenizer, CREATIVE_PROMPTS, session=session)
            answers = answer_questions(generator, tokenizer, session=session)
            timing = checkpoint.metrics.get("timing", {})
            if "preprocessing_seconds" in timing:
                report.senab["preprocessing_seconds"] = timing["preprocessing_seconds"]
            report.senab.update(_senab_state_metrics(model, tokenizer, checkpoint, data.test, cache, generator,
                                                     out_dir, report))
        else:
            if method in ("lora", "ia3"):
                model = load_baseline(model, run_dir / method / "final" / "adapter")
            scores.perplexity = plain_perplexity(model, data.test)
            generator = Generator(model, tokenizer)
            replies = sample_replies(generator, tokenizer, CREATIVE_PROMPTS, session=None)
            answers = answer_questions(generator, tokenizer)
        scores.distinct_1 = distinct_n(replies, 1)
        scores.distinct_2 = distinct_n(replies, 2)
        qa = scorer.score(answers)
        scores.semantic_similarity, scores.rouge_l = qa.semantic_similarity, qa.rouge_l
        scores.qa_by_kind, scores.qa_reply_words = qa.by_kind, qa.mean_words
        report.methods.append(scores)
        (out_dir / "samples").mkdir(exist_ok=True)
        (out_dir / "samples" / f"{method}.json").write_text(
            json.dumps(dict(zip(CREATIVE_PROMPTS, replies)), indent=1, ensure_ascii=False) + "\n")
        (out_dir / "samples" / f"qa-{method}.json").write_text(
            json.dumps(qa.per_question, indent=1, ensure_ascii=False) + "\n")
        logger.info("evaluated %s in %.0f s: perplexity %.3f", method, time.perf_counter() - started,
                    scores.perplexity)

    by_name = {m.name: m for m in report.methods}
    base, senab, lora = by_name.get("base"), by_name.get("SENAB"), by_name.get("LoRA r=32")
    if base and senab and lora and base.perplexity != lora.perplexity:
        report.senab["gap_closed"] = (base.perplexity - senab.perplexity) / (base.perplexity - lora.perplexity)
    if senab and lora and senab.seconds_per_step and lora.seconds_per_step:
        report.senab["step_ratio"] = senab.seconds_per_step / lora.seconds_per_step
    if histories:
        render.plot_losses(histories, out_dir / "training-loss.png")
        render.plot_costs([vars(m) for m in report.methods], out_dir / "method-costs.png")
        report.plots.update({"losses": "training-loss.png", "costs": "method-costs.png"})

    (out_dir / "evaluation.json").write_text(json.dumps({
        "methods": [vars(m) for m in report.methods], "senab": report.senab, "data": data_record,
    }, indent=1, default=_json_default) + "\n")
    (out_dir / "evaluation.md").write_text(render.markdown(report, command=command, hardware=hardware_description(),
                                                           data=data_record))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _senab_state_metrics(model, tokenizer, checkpoint, windows: list[Window], cache: LowerCache,
                         generator: Generator, out_dir: Path, report: Report) -> dict[str, Any]:
    from senab import report as render

    law: Homeostasis = checkpoint.homeostasis
    predicted, labels = [], []
    for index, window in enumerate(windows):
        _, valences = state_chain(checkpoint, checkpoint.probe, window, cache.get(index, window), law)
        predicted += valences
        labels += [turn.valence for turn in window.turns]
    scripted = scripted_trajectory(model, tokenizer, checkpoint, checkpoint.probe)
    points, styles = style_readouts(model, tokenizer, checkpoint, generator)
    trace, tokens = growth_trace(model, tokenizer, checkpoint)

    per_token, reply_offset, token_labels = hostile_turn_token_states(model, tokenizer, checkpoint, scripted)
    jump = style_jump(generator, tokenizer, checkpoint)

    render.plot_trajectory(scripted, HOSTILE_TURN, out_dir / "affect-trajectory.png")
    render.plot_state_paths(pca(np.stack(scripted["states"])), HOSTILE_TURN, pca(per_token), token_labels,
                            reply_offset, out_dir / "state-trajectory-3d.png")
    render.plot_style_jump(jump, pca(np.stack([t["state"] for t in jump])), out_dir / "style-jump.png")
    render.plot_styles(points, styles, out_dir / "style-scatter.png")
    render.plot_growth(trace, tokens, out_dir / "nca-growth.png")
    report.plots.update({"trajectory": "affect-trajectory.png", "state_paths": "state-trajectory-3d.png",
                         "style_jump": "style-jump.png", "styles": "style-scatter.png", "growth": "nca-growth.png"})
    return {"valence_r": pearson(predicted, labels) if checkpoint.probe is not None else math.nan,
            "scripted": scripted, "silhouette": silhouette(points, styles), "alpha": law.alpha, "beta": law.beta,
            "checkpoint": checkpoint.checkpoint_id,
            "style_jump": [{k: v for k, v in t.items() if k != "state"} for t in json_ready(jump)]}


def hostile_turn_token_states(model, tokenizer, checkpoint, scripted: dict[str, Any]) -> tuple[np.ndarray, int,
                                                                                                list[str]]:
    """Return the per-token states of the scripted hostile turn, the reply's offset in them,
    and the tokens as text."""
    window = encode_window(tokenizer, "scripted", SCRIPTED_CONVERSATION, [0.0] * len(SCRIPTED_CONVERSATION))
    hidden = lower_hidden(model, window.ids, checkpoint.bridge.config.first_layer)
    before = torch.as_tensor(scripted["states"][HOSTILE_TURN - 1], device=hidden.device)
    states, offset = token_states(checkpoint, window, hidden, HOSTILE_TURN, before)
    turn = window.turns[HOSTILE_TURN]
    return states, offset, readable_tokens(tokenizer, window.ids[turn.user_start:turn.reply_end])


def readable_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Return token strings for plot labels, with byte-level BPE's space and newline marks undone."""
    return [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in tokenizer.convert_ids_to_tokens(ids)]
