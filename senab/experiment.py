"""`senab train`: prepare the data once, train each method, finish the SENAB checkpoint.

Output layout under the run directory:

    data.json                  split seed, window counts, first conversation ids
    senab/step-NNNNNN/         resumable training states (also servable checkpoints)
    senab/final/               the servable checkpoint: bridge, probe, homeostasis, manifest
    senab/history.json         loss and seconds of every step
    lora/final/adapter/, ia3/final/adapter/, lora/history.json, ...
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from senab.data import Split, Window, iter_windows, load_chitchat, make_windows, pick_with_negatives, split_conversations
from senab.train import (
    LowerCache, TrainConfig, Trainer, arousal_scale, latest_step_dir, select_homeostasis, write_history,
)

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    data_seed: int = 0
    turns_per_window: int = 4
    max_length: int = 512
    train_windows: int = 1000
    # Windows after the training windows (same split, no overlap) that feed only the state
    # losses of SENAB (`TrainConfig.state_batch`); the baselines never see them.
    state_windows: int = 0
    # Share of the state windows that hold a negative user message (`senab.data.pick_with_negatives`).
    state_negative_share: float = 0.5
    validation_windows: int = 60
    test_windows: int = 100
    conversations: int | None = None  # use only the first N conversations (tests)


@dataclass
class PreparedData:
    split: Split
    train: list[Window]
    state: list[Window]
    validation: list[Window]
    test: list[Window]


def prepare_data(tokenizer, config: DataConfig) -> PreparedData:
    conversations = load_chitchat()
    if config.conversations is not None:
        conversations = conversations[:config.conversations]
    split = split_conversations(conversations, seed=config.data_seed)

    def windows(part, limit):
        return make_windows(tokenizer, part, turns_per_window=config.turns_per_window,
                            max_length=config.max_length, max_windows=limit)

    candidates = iter_windows(tokenizer, split.train, turns_per_window=config.turns_per_window,
                              max_length=config.max_length)
    train = list(itertools.islice(candidates, config.train_windows))
    state = pick_with_negatives(candidates, config.state_windows, config.state_negative_share)
    return PreparedData(split=split, train=train, state=state,
                        validation=windows(split.validation, config.validation_windows),
                        test=windows(split.test, config.test_windows))


def write_data_record(data: PreparedData, config: DataConfig, path: Path) -> None:
    path.write_text(json.dumps({
        "source": "chitchat-dataset",
        "config": dataclasses.asdict(config),
        "conversations": {"train": len(data.split.train), "validation": len(data.split.validation),
                          "test": len(data.split.test)},
        "windows": {"train": len(data.train), "state": len(data.state), "validation": len(data.validation),
                    "test": len(data.test)},
        "test_conversation_ids": [c.id for c in data.split.test],
    }, indent=1) + "\n")


def train_method(load, method: str, data: PreparedData, train_config: TrainConfig, run_dir: Path, *,
                 resume: bool, progress: bool) -> Path:
    """Train one method and write its final output; return the final directory."""
    loaded = load()
    out = run_dir / method
    trainer = Trainer(loaded.model, loaded.tokenizer, data.train, train_config, out, state_windows=data.state,
                      base_model=loaded.name, base_digest=loaded.digest, progress=progress)
    previous = latest_step_dir(out) if resume else None
    if previous is not None:
        trainer.resume(previous)
    started = time.perf_counter()
    if method == "senab":
        # Activations below the bridge depend on neither the bridge nor the state: compute
        # them once for every window before the first step (reported as preprocessing).
        from tqdm import tqdm

        for index, window in enumerate(tqdm(data.train, desc="cache layer inputs", disable=not progress)):
            trainer.cache.get(index, window)
        if train_config.state_batch:
            for index, window in enumerate(tqdm(data.state, desc="cache state windows", disable=not progress)):
                trainer.state_cache.get(index, window)
        preprocessing = time.perf_counter() - started
    else:
        preprocessing = 0.0
    result = trainer.train()
    write_history(result, out / "history.json")

    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    if method != "senab":
        trainer.model.save_pretrained(final / "adapter")
        return final

    cache = LowerCache(trainer.model, trainer.checkpoint.bridge.config.first_layer)
    law, grid = select_homeostasis(trainer.checkpoint, trainer.probe, data.validation, cache)
    trainer.homeostasis = law
    trainer.checkpoint.arousal_scale = arousal_scale(trainer.checkpoint, data.validation, cache, law)
    checkpoint = trainer.servable_checkpoint(
        homeostasis_search=grid,
        timing={"seconds_per_step": result.seconds_per_step, "train_seconds": result.total_seconds,
                "preprocessing_seconds": preprocessing},
        data={"seed": train_config.data_seed, "train_windows": len(data.train), "state_windows": len(data.state)},
    )
    checkpoint.save(final)
    logger.info("SENAB checkpoint %s saved to %s (alpha %.2f, beta %.2f, arousal scale %.3f)",
                checkpoint.checkpoint_id, final, law.alpha, law.beta, checkpoint.arousal_scale)
    return final


def run(load, methods: list[str], run_dir: Path, data_config: DataConfig, train_config: TrainConfig, *,
        resume: bool = False, progress: bool = True) -> dict[str, Path]:
    """Train every method in `methods` on the same prepared data; return their final directories."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load().tokenizer
    data = prepare_data(tokenizer, data_config)
    write_data_record(data, data_config, run_dir / "data.json")
    logger.info("data: %d train, %d validation, %d test windows", len(data.train), len(data.validation),
                len(data.test))
    finals = {}
    for method in methods:
        config = dataclasses.replace(train_config, method=method, data_seed=data_config.data_seed,
                                     turns_per_window=data_config.turns_per_window,
                                     max_length=data_config.max_length)
        if method != "senab" and config.learning_rate == TrainConfig.learning_rate:
            # The adapters get their own learning rates: 2e-4 for LoRA, 3e-3 for IA3.
            config = dataclasses.replace(config, learning_rate=2e-4 if method == "lora" else 3e-3)
        finals[method] = train_method(load, method, data, config, run_dir, resume=resume, progress=progress)
    return finals
