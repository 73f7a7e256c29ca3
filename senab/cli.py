"""Model-side commands of `senab`: `models pull` and `bridge info`.

The installed `senab` command (`app.cli`) adds `serve` to this parser, so this package
never imports the service package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("senab")

def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _pull(args: argparse.Namespace) -> int:
    from senab.models import ModelError, pull_model

    try:
        path = pull_model(args.name, home=_home(args), force=args.force)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from senab.experiment import DataConfig, run
    from senab.train import TrainConfig

    loader = _model_loader(args)
    if loader is None:
        return 1
    load, model_name = loader
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"senab", "lora", "ia3"})
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; use senab, lora and/or ia3", file=sys.stderr)
        return 2
    data_config = DataConfig(data_seed=args.data_seed, turns_per_window=args.turns, max_length=args.max_length,
                             train_windows=args.train_windows, state_windows=args.state_windows)
    defaults = TrainConfig()
    train_config = TrainConfig(steps=args.steps or defaults.steps, batch_size=args.batch_size or defaults.batch_size,
                               seed=args.seed,
                               checkpoint_every=args.checkpoint_every, lm_loss_turns=args.lm_loss_turns,
                               valence_weight=args.valence_weight, set_point_weight=args.set_point_weight,
                               arousal_weight=args.arousal_weight, arousal_distance=args.arousal_distance,
                               state_batch=args.state_batch if args.state_windows else 0)
    finals = run(load, methods, Path(args.out), data_config, train_config, resume=args.resume)
    for method, path in finals.items():
        print(f"{method}: {path}")
    if args.ship and "senab" in finals:
        from senab.bridge import SHIPPED_WEIGHTS

        target = SHIPPED_WEIGHTS / model_name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(finals["senab"], target)
        print(f"shipped: {target}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from senab.evaluate import evaluate_run

    run_dir = Path(args.run)
    if not (run_dir / "data.json").exists():
        print(f"error: {run_dir} has no data.json; run `senab train --out {run_dir}` first", file=sys.stderr)
        return 1
    loader = _model_loader(args)
    if loader is None:
        return 1
    load, _ = loader
    command = "senab eval " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "senab eval"
    evaluate_run(load, run_dir, Path(args.out), command=command, test_windows=args.test_windows)
    print(Path(args.out) / "evaluation.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import shutil
    import warnings
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from senab.bridge import CheckpointError, checkpoint_for_model
    from senab.compare import DEFAULT_RUN_DIRS, AdapterError, Comparison, find_adapters, minimum_width
    from senab.generation import SamplingParams
    from senab.models import ModelError, load_model

    if not args.verbose:
        logging.getLogger("senab").setLevel(logging.WARNING)
        hf_logging.disable_progress_bar()
        # peft's adapter loading calls a transformers API that warns of its own deprecation.
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}; change --max-tokens, --temperature or --top-p", file=sys.stderr)
        return 2
    if args.prompt is not None and not args.prompt.strip():
        print("error: the prompt is empty; pass a message, or no prompt for a prompt loop", file=sys.stderr)
        return 2
    if args.run and not Path(args.run).is_dir():
        print(f"error: run directory {args.run} not found; pass the --out directory of `senab train`",
              file=sys.stderr)
        return 1
    run_dir, adapters = find_adapters(Path(args.run) if args.run else None)
    narrowest = minimum_width(2 + len(adapters))
    if args.width is not None and args.width < narrowest:
        print(f"error: --width {args.width} is too narrow for {2 + len(adapters)} columns; use at least {narrowest}",
              file=sys.stderr)
        return 2
    if not adapters:
        where = run_dir if run_dir is not None else " or ".join(str(d) for d in DEFAULT_RUN_DIRS)
        print(f"note: no LoRA or IA3 adapter in {where}; `make train` trains them", file=sys.stderr)

    def load():
        return load_model(args.model, device=args.device, dtype=args.dtype, home=_home(args))

    try:
        first = load()
        checkpoint, origin = checkpoint_for_model(first.name, first.model.config, path=args.bridge,
                                                  base_digest=first.digest)
        copies = [first.model]
        comparison = Comparison(lambda: copies.pop() if copies else load().model, first.tokenizer, checkpoint,
                                adapters, sampling)
    except (ModelError, CheckpointError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    width = args.width or max(narrowest, min(100, shutil.get_terminal_size((100, 24)).columns))
    try:
        return _compare_loop(args, comparison, first, checkpoint, origin, adapters, sampling, width)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _compare_loop(args, comparison, loaded, checkpoint, origin: str, adapters, sampling, width: int) -> int:
    """Answer the prompt, or every line of the prompt loop, and print the columns or JSON."""
    from senab.compare import answers_json, describe_settings, printable, render_columns, wrap

    header = {"model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
              "checkpoint": checkpoint.checkpoint_id, "checkpoint_trained": origin != "untrained",
              "adapters": {m: str(p) for m, p in adapters.items()},
              "sampling": {"max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                           "top_p": sampling.top_p, "seed": sampling.seed}}
    if not args.json:
        untrained = " (untrained: replies equal the base model's)" if origin == "untrained" else ""
        print("\n".join(wrap(f"{loaded.name} on {header['device']} ({header['dtype']}); bridge "
                             f"{checkpoint.checkpoint_id}{untrained}", width)))
        print("\n".join(wrap(f"sampling: {describe_settings(sampling)}; same settings and seed in every column",
                             width)))

    def answer(prompt: str) -> None:
        turn = comparison.turn + 1
        answers = comparison.ask(prompt)
        if args.json:
            print(answers_json(prompt, turn, answers, header), flush=True)
        else:
            print("\n" + "\n".join(wrap(f"turn {turn}: {printable(prompt)}", width)) + "\n")
            print(render_columns(answers, width), flush=True)

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive and not args.json:
        print("Type a message; /reset starts a new conversation, /quit or Ctrl-D ends.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            break
        prompt = line.strip()
        if not prompt:
            continue
        if prompt == "/quit":
            break
        if prompt == "/reset":
            comparison.reset()
            if not args.json:
                print("new conversation; SENAB's state is back at the set-point")
            continue
        answer(prompt)
    return 0


def _bridge_info(args: argparse.Namespace) -> int:
    from senab.bridge import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(args.path)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(checkpoint.manifest(), indent=2))
    return 0


def _model_loader(args: argparse.Namespace):
    """Return (load, model name), where `load()` loads the base model in float32 for training
    or evaluation; print the error and return None when the model cannot be loaded."""
    from senab.models import ModelError, load_model

    def load():
        return load_model(args.model, dtype="float32", device=args.device, home=_home(args))

    try:
        loaded = load()
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return load, loaded.name


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model (default SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--home", help="directory for pulled models and compiled operators (default ~/.cache/senab)")


def _home(args: argparse.Namespace):
    from pathlib import Path

    return Path(args.home).expanduser() if args.home else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="senab", description="SENAB: chat serving with an NCA bridge.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="manage base models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser("pull", help="download and convert a model (default SmolLM2-135M-Instruct)")
    pull.add_argument("name", nargs="?", default="SmolLM2-135M-Instruct", help="model name")
    pull.add_argument("--home", help="directory for pulled models and compiled operators (default $SENAB_HOME or ~/.cache/senab)")
    pull.add_argument("--force", action="store_true", help="download and convert again even if present")
    pull.set_defaults(func=_pull)

    train = commands.add_parser("train", help="train the bridge (and LoRA / IA3 baselines) on chitchat")
    train.add_argument("--out", default="runs/default", help="run directory (default runs/default)")
    train.add_argument("--methods", default="senab", help="comma-separated: senab, lora, ia3 (default senab)")
    _add_model_arguments(train)
    train.add_argument("--steps", type=int, help="optimizer steps per method (default 400)")
    train.add_argument("--batch-size", type=int, help="windows per step (default 2)")
    train.add_argument("--turns", type=int, default=4, help="user/assistant turns per window (default 4)")
    train.add_argument("--max-length", type=int, default=512, help="maximum window length in tokens (default 512)")
    train.add_argument("--train-windows", type=int, default=1000, help="training windows (default 1000)")
    train.add_argument("--lm-loss-turns", type=int, default=0,
                       help="SENAB: last turns per window with a language-model loss; 0 means all")
    train.add_argument("--valence-weight", type=float, default=10.0,
                       help="SENAB: weight of the valence loss (default 10)")
    train.add_argument("--set-point-weight", type=float, default=1.0,
                       help="SENAB: weight of the loss pulling the set-point toward the mean readout")
    train.add_argument("--arousal-weight", type=float, default=3.0,
                       help="SENAB: weight of the loss making the distance to the set-point track |VADER| (default 3)")
    train.add_argument("--arousal-distance", type=float, default=2.0,
                       help="SENAB: distance to the set-point that |VADER| = 1 should reach (default 2)")
    train.add_argument("--state-windows", type=int, default=0,
                       help="SENAB: extra training windows that feed only the state losses (default 0)")
    train.add_argument("--state-batch", type=int, default=4,
                       help="SENAB: state windows per step, when --state-windows is set (default 4)")
    train.add_argument("--seed", type=int, default=0, help="initialisation seed")
    train.add_argument("--data-seed", type=int, default=0, help="seed of the conversation split and order")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from the latest step-* checkpoint")
    train.add_argument("--ship", action="store_true", help="copy the SENAB checkpoint into senab/weights/")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="evaluate a training run and write the report with plots")
    evaluate.add_argument("--run", default="runs/default", help="run directory of `senab train`")
    evaluate.add_argument("--out", default="docs", help="directory for evaluation.md and the plots (default docs)")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--test-windows", type=int, help="test windows for perplexity (default: as trained)")
    evaluate.set_defaults(func=_eval)

    compare = commands.add_parser(
        "compare", help="answer a prompt side by side with the base model, SENAB and trained adapters",
        description="Answer one prompt (or, without one, each line read from the terminal or stdin, as one "
                    "conversation) with the base model, SENAB and the LoRA / IA3 adapters of a training run, "
                    "with the same sampling settings and seed in every column.")
    compare.add_argument("prompt", nargs="?", help="the user message; omit it for a prompt loop")
    _add_model_arguments(compare)
    compare.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default auto)")
    compare.add_argument("--bridge", help="bridge checkpoint directory (default: the one shipped for the model)")
    compare.add_argument("--run", help="`senab train` run directory with lora/ and ia3/ adapters "
                                       "(default: runs/smollm2, then runs/default)")
    compare.add_argument("--max-tokens", type=int, default=128, help="tokens per reply (default 128)")
    compare.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    compare.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    compare.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every column (default 0)")
    compare.add_argument("--width", type=int, help="output width in terminal columns (default: terminal width, at most 100)")
    compare.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of columns")
    compare.add_argument("--verbose", action="store_true", help="show model loading logs")
    compare.set_defaults(func=_compare)

    bridge = commands.add_parser("bridge", help="inspect bridge checkpoints")
    bridge_commands = bridge.add_subparsers(dest="bridge_command", required=True)
    info = bridge_commands.add_parser("info", help="print a checkpoint's manifest")
    info.add_argument("path", help="checkpoint directory (bridge.safetensors + manifest.json)")
    info.set_defaults(func=_bridge_info)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    if args.command != "serve":
        configure_logging(os.environ.get("SENAB_LOG_LEVEL", "INFO"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
