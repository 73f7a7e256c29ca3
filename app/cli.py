"""The installed `senab` command: the model-side commands plus `senab serve`."""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from senab import cli as model_cli

# `senab serve` flags and the environment variables they set; Settings reads the latter.
SERVE_FLAGS: list[tuple[str, str, str]] = [
    ("--host", "SENAB_HOST", "address to bind (default 127.0.0.1)"),
    ("--port", "SENAB_PORT", "TCP port (default 8000)"),
    ("--model", "SENAB_MODEL", "base model: a directory, a .gguf file or a hub id (default SmolLM2-135M-Instruct)"),
    ("--device", "SENAB_DEVICE", "auto, cpu, cuda or cuda:N (default auto)"),
    ("--dtype", "SENAB_DTYPE", "auto, float32, bfloat16 or float16 (default auto)"),
    ("--quantization", "SENAB_QUANTIZATION",
     "auto, none or int4 (default auto). On a CPU, auto takes 4-bit weights in bfloat16 where they are exact "
     "(with oneDNN-packed bfloat16 copies for batches where the CPU has AMX) and oneDNN-packed weights in "
     "float32. none keeps plain dense weights. int4 needs bfloat16 and keeps no copies"),
    ("--home", "SENAB_HOME", "directory for pulled models and compiled operators (default ~/.cache/senab)"),
    ("--bridge", "SENAB_BRIDGE", "bridge checkpoint directory (default: the shipped or untrained one)"),
    ("--redis-url", "REDIS_URL", "Redis URL for session state (default: in-process memory)"),
    ("--log-level", "SENAB_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    ("--log-format", "SENAB_LOG_FORMAT", "text or json (default text)"),
]


SECRET_SETTINGS = frozenset({"api_keys", "redis_url"})


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import Settings
    from app.logs import configure_logging
    from app.main import create_app, load_served_model
    from senab.bridge import CheckpointError
    from senab.models import ModelError

    for flag, env, _ in SERVE_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            os.environ[env] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            env = "REDIS_URL" if field == "redis_url" else f"SENAB_{field.upper()}"
            # A secret's value stays out of the message; the validator's text explains the problem.
            value = "" if field in SECRET_SETTINGS else f"={error.get('input')!r}"
            print(f"error: invalid setting {env}{value}: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # Loading before uvicorn starts turns a missing or corrupt model into one error line.
    try:
        served = load_served_model(settings)
    except (ModelError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, served=served)
    try:
        # access_log=False: the app logs one access line per request itself (app.main).
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=30)
    except SystemExit as exc:  # uvicorn exits this way when start-up fails
        return int(exc.code or 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = model_cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve_parser = commands.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                                       description="Each flag overrides the environment variable named in its help.")
    for flag, env, text in SERVE_FLAGS:
        serve_parser.add_argument(flag, help=f"{text}; environment variable {env}")
    serve_parser.set_defaults(func=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    return model_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
