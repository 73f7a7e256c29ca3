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


def _bridge_info(args: argparse.Namespace) -> int:
    from senab.bridge import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(args.path)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(checkpoint.manifest(), indent=2))
    return 0


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
    pull.add_argument("--home", help="directory for pulled models (default $SENAB_HOME or ~/.cache/senab)")
    pull.add_argument("--force", action="store_true", help="download and convert again even if present")
    pull.set_defaults(func=_pull)

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
