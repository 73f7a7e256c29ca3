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


def markdown(report, *, command: str, hardware: str, data: dict[str, Any]) -> str:
    rows = ["| method | trainable parameters | s / step | training s | test perplexity | Distinct-1 | Distinct-2 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in report.methods:
        rows.append(f"| {m.name} | {_fmt(m.trainable_parameters)} | {_fmt(m.seconds_per_step, 2)} | "
                    f"{_fmt(m.train_seconds, 0)} | {_fmt(m.perplexity)} | {_fmt(m.distinct_1)} | "
                    f"{_fmt(m.distinct_2)} |")
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
    for title, name in (("Training loss", "losses"), ("Affect trajectory", "trajectory"),
                        ("Style scatter", "styles"), ("NCA growth", "growth")):
        if name in report.plots:
            lines += [f"## {title}", "", f"![{title}]({report.plots[name]})", ""]
    return "\n".join(lines)


def rewrite_markdown(out_dir: Path, *, command: str, hardware: str) -> None:
    """Render `evaluation.md` again from `evaluation.json` (after the report format changed)."""
    import json
    from types import SimpleNamespace

    saved = json.loads((out_dir / "evaluation.json").read_text())
    plots = {name: file for name, file in (("losses", "training-loss.png"), ("trajectory", "affect-trajectory.png"),
                                           ("styles", "style-scatter.png"), ("growth", "nca-growth.png"))
             if (out_dir / file).exists()}
    report = SimpleNamespace(methods=[SimpleNamespace(**m) for m in saved["methods"]], senab=saved["senab"],
                             plots=plots)
    (out_dir / "evaluation.md").write_text(markdown(report, command=command, hardware=hardware, data=saved["data"]))
