"""Plots and the markdown table of `senab eval`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_growth(trace: list[np.ndarray], tokens: list[str], path: Path) -> None:
    """Heatmap of the lattice (channels x positions) before and after each NCA step."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(trace), 1, figsize=(12, 1.4 * len(trace)), sharex=True)
    limit = max(float(np.abs(t).max()) for t in trace) or 1.0
    for step, (ax, lattice) in enumerate(zip(axes, trace)):
        ax.imshow(lattice.T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_ylabel(f"step {step}", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_yticks([])
    stride = max(1, len(tokens) // 40)
    axes[-1].set_xticks(range(0, len(tokens), stride))
    axes[-1].set_xticklabels([tokens[i] for i in range(0, len(tokens), stride)], rotation=90, fontsize=6)
    fig.suptitle("NCA lattice growth over one turn (rows: channels; colour: cell value)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectory(scripted: dict[str, Any], hostile_turn: int, path: Path) -> None:
    plt = _pyplot()
    turns = np.arange(1, len(scripted["distances"]) + 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(turns, scripted["distances"], marker="o", label="distance to set-point")
    ax.plot(turns, scripted["arousal"], marker="s", label="arousal")
    if not any(v is None or math.isnan(v) for v in scripted["valence"]):
        ax.plot(turns, scripted["valence"], marker="^", label="valence")
    ax.plot(turns, scripted["vader"], linestyle=":", color="grey", label="VADER of user message")
    ax.axvline(hostile_turn + 1, color="red", alpha=0.3, label="hostile turn")
    ax.set_xlabel("turn")
    ax.set_title("Affect over a scripted conversation (neutral, hostile, neutral)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_styles(points: np.ndarray, labels: list[str], path: Path) -> None:
    """Scatter of the readouts projected on their first two principal components."""
    plt = _pyplot()
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6, 5))
    for style in dict.fromkeys(labels):
        mask = np.array([label == style for label in labels])
        ax.scatter(projected[mask, 0], projected[mask, 1], label=style)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Turn readouts by prompt style (PCA)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(histories: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for method, history in histories.items():
        steps = [r["step"] for r in history["history"]]
        losses = np.array([r["lm_loss"] for r in history["history"]])
        window = min(20, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"{method} (LM loss, {window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on reply tokens")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STYLE_COLOURS = {"academic": "tab:blue", "child": "tab:orange", "poetic": "tab:green"}


def _path_3d(ax, points: np.ndarray, explained: np.ndarray, labels: list[str], colours: list[str]) -> None:
    ax.plot(points[:, 0], points[:, 1], points[:, 2], color="grey", alpha=0.5)
    ax.scatter(points[:, 0], points[:, 1], points[:, 2], c=colours, s=30, depthshade=False)
    for point, label in zip(points, labels):
        if label:
            ax.text(point[0], point[1], point[2], label, fontsize=7)
    for axis, (name, share) in zip("xyz", enumerate(explained, 1)):
        getattr(ax, f"set_{axis}label")(f"PC {name} ({share:.0%})", fontsize=8)
    ax.tick_params(labelsize=6)


def plot_state_paths(turns: tuple[np.ndarray, np.ndarray], hostile_turn: int,
                     tokens: tuple[np.ndarray, np.ndarray], token_labels: list[str], reply_offset: int,
                     path: Path) -> None:
    """Plot the state's 3-D PCA paths: after each turn of a conversation and after each token of one turn."""
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 5.5))
    points, explained = turns
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    colours = ["tab:red" if i == hostile_turn else "tab:blue" for i in range(len(points))]
    _path_3d(ax, points, explained, [f"turn {i + 1}" for i in range(len(points))], colours)
    ax.set_title("State after each turn (red: the hostile turn)", fontsize=10)
    points, explained = tokens
    ax = fig.add_subplot(1, 2, 2, projection="3d")
    colours = ["tab:grey" if i < reply_offset else "tab:purple" for i in range(len(points))]
    stride = max(1, len(points) // 12)
    labels = [token_labels[i] if i % stride == 0 or i == len(points) - 1 else "" for i in range(len(points))]
    _path_3d(ax, points, explained, labels, colours)
    ax.set_title("State after each token of the hostile turn\n(grey: user message, purple: reply)", fontsize=10)
    fig.suptitle("Session state trajectories, projected on their first three principal components")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_style_jump(turns: list[dict[str, Any]], projected: tuple[np.ndarray, np.ndarray], path: Path) -> None:
    """Plot a style-jump conversation: its 3-D state path and its affect over the turns."""
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 5))
    points, explained = projected
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    _path_3d(ax, points, explained, [f"{i + 1}" for i in range(len(points))],
             [STYLE_COLOURS.get(t["style"], "black") for t in turns])
    ax.set_title("State after each turn (PCA)", fontsize=10)
    ax = fig.add_subplot(1, 2, 2)
    x = np.arange(1, len(turns) + 1)
    ax.plot(x, [t["distance"] for t in turns], marker="o", label="distance to set-point")
    ax.plot(x, [t["arousal"] for t in turns], marker="s", label="arousal")
    if all(t["valence"] is not None for t in turns):
        ax.plot(x, [t["valence"] for t in turns], marker="^", label="valence")
    for i, turn in enumerate(turns):
        ax.axvspan(i + 0.5, i + 1.5, color=STYLE_COLOURS.get(turn["style"], "white"), alpha=0.12, lw=0)
    handles, _ = ax.get_legend_handles_labels()
    from matplotlib.patches import Patch

    handles += [Patch(color=c, alpha=0.3, label=f"{s} request") for s, c in STYLE_COLOURS.items()]
    ax.legend(handles=handles, fontsize=7)
    ax.set_xlabel("turn")
    ax.set_xticks(x)
    ax.set_title("Affect over the turns", fontsize=10)
    fig.suptitle("Style jump: academic, then child-directed, then poetic requests about one topic")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_costs(methods: list[dict[str, Any]], path: Path) -> None:
    """Plot each method's trainable parameters (log scale), seconds per step and training time."""
    plt = _pyplot()
    trained = [m for m in methods if m.get("trainable_parameters")]
    names = [m["name"] for m in trained]
    colours = ["tab:purple" if n == "SENAB" else "tab:grey" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = ((axes[0], [m["trainable_parameters"] for m in trained], "trainable parameters (log scale)", "{:,.0f}"),
              (axes[1], [m.get("seconds_per_step") or 0 for m in trained], "seconds per step", "{:.2f}"),
              (axes[2], [m.get("train_seconds") or 0 for m in trained], "training seconds (steps only)", "{:.0f}"))
    for ax, values, title, fmt in panels:
        bars = ax.bar(names, values, color=colours)
        for bar, value in zip(bars, values):
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_yscale("log")
    fig.suptitle("Cost of each method on the same data, steps and batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def target_rows(methods: list[dict[str, Any]], senab: dict[str, Any]) -> list[str]:
    """Return markdown rows comparing each measured value with its target."""
    by_name = {m["name"]: m for m in methods}
    base, bridge, lora = by_name.get("base"), by_name.get("SENAB"), by_name.get("LoRA r=32")
    rows = []

    def row(name: str, target: str, value: Any, met: bool | None) -> None:
        if met is None:
            verdict = "n/a"
        else:
            verdict = "met" if met else "missed"
        rows.append(f"| {name} | {target} | {_fmt(value) if not isinstance(value, str) else value} | {verdict} |")

    if bridge and bridge.get("trainable_parameters") is not None:
        params = bridge["trainable_parameters"]
        row("SENAB trainable parameters", "<= 64,000", params, params <= 64_000)
        if lora and lora.get("trainable_parameters"):
            share = params / lora["trainable_parameters"]
            row("SENAB parameters / LoRA parameters", "<= 0.05", share, share <= 0.05)
    ratio = senab.get("step_ratio")
    row("SENAB / LoRA seconds per step", "<= 0.5", ratio, None if ratio is None else ratio <= 0.5)
    if base and bridge:
        row("SENAB test perplexity", f"< base ({_fmt(base['perplexity'])})", bridge["perplexity"],
            bridge["perplexity"] < base["perplexity"])
    r = senab.get("valence_r")
    row("valence Pearson r on test turns", ">= 0.5", r, None if r is None or math.isnan(r) else r >= 0.5)
    scripted = senab.get("scripted", {})
    row("distance rises after the hostile turn", "yes", str(scripted.get("distance_rises")),
        scripted.get("distance_rises"))
    half = scripted.get("half_life_turns")
    row("distance halves within 3 neutral turns", "<= 3 turns", "never" if half is None else half,
        half is not None and half <= 3)
    return rows


# (section title, key in Report.plots, file name), in the report's order.
PLOTS = (
    ("Training loss", "losses", "training-loss.png"),
    ("Cost of each method", "costs", "method-costs.png"),
    ("Affect trajectory", "trajectory", "affect-trajectory.png"),
    ("State trajectory in 3-D", "state_paths", "state-trajectory-3d.png"),
    ("Style jump", "style_jump", "style-jump.png"),
    ("Style scatter", "styles", "style-scatter.png"),
    ("NCA growth", "growth", "nca-growth.png"),
)

# The original notebook's numbers (DESIGN.md section 2): TinyLlama-1.1B-Chat, 1,000 Alpaca examples.
ORIGINAL = {
    "parameters": (34_753, 3_244_032),
    "train_seconds": (439, 798),
    "perplexity": (4.62, 4.54, 3.95),  # base, SENAB, LoRA
    "distinct_2": (0.995, 0.925),  # SENAB, LoRA; 5 creative prompts
    "semantic_similarity": (0.70, 0.72),  # SENAB, LoRA; 10 questions
    "rouge_l": (0.26, 0.27),
}


def qa_lines(methods: list[dict[str, Any]]) -> list[str]:
    """Return the question-answering table by kind of question, or nothing without scores."""
    scored = [m for m in methods if m.get("qa_by_kind")]
    if not scored:
        return []
    kinds = list(scored[0]["qa_by_kind"])
    lines = ["Question answering (greedy, the project's 32 questions; semantic similarity / ROUGE-L F1 against "
             "the reference answer; replies in samples/qa-*.json):", "",
             "| method | " + " | ".join(kinds) + " | all | mean reply words |",
             "| --- |" + " ---: |" * (len(kinds) + 2)]
    for m in scored:
        cells = [f"{_fmt(m['qa_by_kind'][k]['semantic_similarity'], 2)} / {_fmt(m['qa_by_kind'][k]['rouge_l'], 2)}"
                 for k in kinds]
        cells.append(f"{_fmt(m['semantic_similarity'], 2)} / {_fmt(m['rouge_l'], 2)}")
        cells.append(_fmt(m.get("qa_reply_words"), 1))
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def original_comparison(methods: list[dict[str, Any]], senab: dict[str, Any]) -> list[str]:
    """Return the section that checks the original's reported effects against this run's numbers."""
    by_name = {m["name"]: m for m in methods}
    base, bridge, lora = by_name.get("base"), by_name.get("SENAB"), by_name.get("LoRA r=32")
    if not (base and bridge and lora):
        return []
    o = ORIGINAL
    rows = []

    def row(effect: str, original: str, measured: str, outcome: bool | str | None, reason: str) -> None:
        if isinstance(outcome, str):
            verdict = outcome
        elif outcome is None:
            verdict = "n/a"
        else:
            verdict = "holds" if outcome else "does not hold"
        rows.append(f"| {effect} | {original} | {measured} | {verdict} | {reason} |")

    if bridge.get("trainable_parameters") and lora.get("trainable_parameters"):
        share = bridge["trainable_parameters"] / lora["trainable_parameters"]
        row("SENAB trains far fewer parameters than LoRA",
            f"{o['parameters'][0]:,} vs {o['parameters'][1]:,} ({o['parameters'][0] / o['parameters'][1]:.1%})",
            f"{bridge['trainable_parameters']:,} vs {lora['trainable_parameters']:,} ({share:.1%})", share < 0.1,
            "Exact counts. The bridge's size depends on the hidden and key/value widths, not on the layer count, "
            "while LoRA adds rank-32 factors to every layer.")
    if bridge.get("train_seconds") and lora.get("train_seconds"):
        steps_ratio = bridge["train_seconds"] / lora["train_seconds"]
        pre = senab.get("preprocessing_seconds")
        with_pre = (bridge["train_seconds"] + pre) / lora["train_seconds"] if pre else None
        measured = f"{bridge['train_seconds']:.0f} s vs {lora['train_seconds']:.0f} s of steps ({steps_ratio:.2f})"
        reason = ("Autograd stops at the first bridged layer, so a SENAB step costs about "
                  f"{senab.get('step_ratio', steps_ratio):.2f} of a LoRA step.")
        if with_pre is not None:
            measured += f"; {with_pre:.2f} with SENAB's {pre:.0f} s of caching layer inputs"
            reason += (" The original reports no preprocessing. Here the frozen layers' outputs are computed "
                       "once per window before training, for the training windows and for the state losses' "
                       "extra windows, which LoRA does not see")
            if with_pre >= 1:
                reason += (": with that, the whole SENAB run is slower than LoRA's, and the cache pays off only "
                           "when training runs over the same windows more often.")
            else:
                reason += ", and the run stays faster overall."
        outcome: bool | str = steps_ratio < 1
        if outcome and with_pre is not None and with_pre >= 1:
            outcome = "holds per step, not for the whole run"
        row("SENAB trains faster than LoRA", f"{o['train_seconds'][0]} s vs {o['train_seconds'][1]} s "
            f"({o['train_seconds'][0] / o['train_seconds'][1]:.2f})", measured, outcome, reason)
    if base.get("perplexity") and bridge.get("perplexity") and lora.get("perplexity"):
        ob, os_, ol = o["perplexity"]
        gap = (base["perplexity"] - bridge["perplexity"]) / (base["perplexity"] - lora["perplexity"])
        row("SENAB lowers perplexity, LoRA lowers it more",
            f"{ob} / {os_} / {ol} (base / SENAB / LoRA; {(ob - os_) / (ob - ol):.0%} of the gap)",
            f"{base['perplexity']:.1f} / {bridge['perplexity']:.1f} / {lora['perplexity']:.1f} ({gap:.0%} of the gap)",
            base["perplexity"] > bridge["perplexity"] > lora["perplexity"],
            "The bridge changes only keys and values of the last layers through 32 channels; LoRA changes every "
            "layer's keys and values. Both were trained on the same chitchat windows.")
    if bridge.get("distinct_2") is not None and lora.get("distinct_2") is not None:
        higher = bridge["distinct_2"] > lora["distinct_2"]
        reason = (f"30 prompts with fixed sampling seeds (the original used 5). The base model scores "
                  f"{base['distinct_2']:.3f}: ")
        if base["distinct_2"] < bridge["distinct_2"]:
            reason += "SENAB's replies are more varied than the base model's."
        else:
            lowest = "LoRA" if lora["distinct_2"] < bridge["distinct_2"] else "SENAB"
            reason += (f"both trained models repeat more than the base model, {lowest} the most, so the "
                       "bridge adds no diversity" + (", it only removes less." if lowest == "LoRA" else "."))
        row("SENAB's replies are more diverse than LoRA's (Distinct-2)",
            f"{o['distinct_2'][0]} vs {o['distinct_2'][1]}",
            f"{bridge['distinct_2']:.3f} vs {lora['distinct_2']:.3f}", higher, reason)
    explain = {"semantic_similarity": "Semantic similarity compares meaning, so a long reply that contains the "
                                      "answer still scores well.",
               "rouge_l": "ROUGE-L F1 counts the words shared in order with a one-sentence reference, so a reply "
                          "much longer than the reference loses precision."}
    for key, name in (("semantic_similarity", "semantic similarity"), ("rouge_l", "ROUGE-L F1")):
        if bridge.get(key) is None or lora.get(key) is None or base.get(key) is None:
            continue
        gap = bridge[key] - lora[key]
        outcome = True if abs(gap) <= 0.05 else f"does not hold: SENAB scores {'higher' if gap > 0 else 'lower'}"
        lengths = ", ".join(f"{m['name']} {m['qa_reply_words']:.0f}" for m in (base, bridge, lora)
                            if m.get("qa_reply_words") is not None)
        reason = "32 questions, greedy; every method was trained on chitchat only. " + explain[key]
        if lengths:
            reason += f" Mean reply length in words: {lengths}."
        row(f"SENAB scores within 0.05 of LoRA on question answering ({name})", f"{o[key][0]} vs {o[key][1]}",
            f"{bridge[key]:.2f} vs {lora[key]:.2f} (base {base[key]:.2f})", outcome, reason)
    if not rows:
        return []
    return ["## The original's reported effects, checked here", "",
            "The original notebook reports these on TinyLlama-1.1B-Chat with 1,000 Alpaca examples; this run uses "
            "SmolLM2-135M-Instruct and chitchat, so the effects are compared, not the values. A verdict is "
            "computed from this run's numbers.", "",
            "| effect | original | here | verdict | why |", "| --- | --- | --- | --- | --- |", *rows, ""]


def style_jump_lines(turns: list[dict[str, Any]]) -> list[str]:
    lines = ["| turn | request | reply (start) | valence | arousal | distance |",
             "| ---: | --- | --- | ---: | ---: | ---: |"]
    for i, t in enumerate(turns, 1):
        reply = " ".join(t["reply"].split())
        reply = (reply[:90] + "...") if len(reply) > 90 else reply
        lines.append(f"| {i} | {t['style']}: {t['user']} | {reply.replace('|', '/')} | {_fmt(t['valence'], 2)} | "
                     f"{_fmt(t['arousal'], 2)} | {_fmt(t['distance'], 2)} |")
    return lines + [""]


def markdown(report, *, command: str, hardware: str, data: dict[str, Any]) -> str:
    rows = ["| method | trainable parameters | s / step | training s | test perplexity | Distinct-1 | Distinct-2 "
            "| QA semantic similarity | QA ROUGE-L F1 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in report.methods:
        rows.append(f"| {m.name} | {_fmt(m.trainable_parameters)} | {_fmt(m.seconds_per_step, 2)} | "
                    f"{_fmt(m.train_seconds, 0)} | {_fmt(m.perplexity)} | {_fmt(m.distinct_1)} | "
                    f"{_fmt(m.distinct_2)} | {_fmt(getattr(m, 'semantic_similarity', None))} | "
                    f"{_fmt(getattr(m, 'rouge_l', None))} |")
    s = report.senab
    lines = [
        "# Evaluation",
        "",
        f"Command: `{command}`. Hardware: {hardware}.",
        "",
        f"Data: chitchat-dataset, split by conversation with seed {data['config']['data_seed']} "
        f"({data['conversations']['train']} / {data['conversations']['validation']} / "
        f"{data['conversations']['test']} conversations); windows of {data['config']['turns_per_window']} "
        f"turns, at most {data['config']['max_length']} tokens: {data['windows']['train']} train, "
        f"{data['windows']['validation']} validation, {data['windows']['test']} test"
        + (f"; SENAB's state losses also see {data['windows']['state']} more training windows "
           "(no language-model loss on them)." if data["windows"].get("state") else "."),
        "",
        *rows,
        "",
        "Perplexity covers the reply tokens of the test windows; Distinct-1/2 the replies to 30 creative "
        "prompts with fixed sampling seeds (samples/*.json); the question-answering columns are explained "
        "below.",
        "",
        "SENAB state metrics:",
        "",
        "| metric | value |",
        "| --- | ---: |",
        f"| valence tracking, Pearson r on test turns | {_fmt(s.get('valence_r'))} |",
        f"| distance rises after the hostile turn | {s.get('scripted', {}).get('distance_rises')} |",
        f"| homeostasis half-life (neutral turns until the distance halves) | "
        f"{_fmt(s.get('scripted', {}).get('half_life_turns'))} |",
        f"| neutral turns until the rise over the pre-hostile distance halves | "
        f"{_fmt(s.get('scripted', {}).get('excess_half_life_turns'))} |",
        f"| style separation, silhouette of readouts | {_fmt(s.get('silhouette'))} |",
        f"| alpha, beta (chosen on validation) | {s.get('alpha')}, {s.get('beta')} |",
        f"| share of the base-to-LoRA perplexity gap closed by SENAB | {_fmt(s.get('gap_closed'))} |",
        f"| SENAB / LoRA seconds per step | {_fmt(s.get('step_ratio'))} |",
        "",
        "Targets:",
        "",
        "| measure | target | value | status |",
        "| --- | --- | ---: | --- |",
        *target_rows([vars(m) for m in report.methods], s),
        "",
    ]
    lines += qa_lines([vars(m) for m in report.methods])
    lines += original_comparison([vars(m) for m in report.methods], s)
    for title, name, _ in PLOTS:
        if name in report.plots:
            lines += [f"## {title}", "", f"![{title}]({report.plots[name]})", ""]
            if name == "style_jump" and s.get("style_jump"):
                lines += style_jump_lines(s["style_jump"])
    return "\n".join(lines)


def rewrite_markdown(out_dir: Path, *, command: str, hardware: str) -> None:
    """Render `evaluation.md` again from `evaluation.json` (after the report format changed)."""
    import json
    from types import SimpleNamespace

    saved = json.loads((out_dir / "evaluation.json").read_text())
    plots = {name: file for _, name, file in PLOTS if (out_dir / file).exists()}
    report = SimpleNamespace(methods=[SimpleNamespace(**m) for m in saved["methods"]], senab=saved["senab"],
                             plots=plots)
    (out_dir / "evaluation.md").write_text(markdown(report, command=command, hardware=hardware, data=saved["data"]))
