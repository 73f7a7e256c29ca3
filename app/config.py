"""Service settings: one pydantic-settings class; nothing else reads the environment."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting comes from a `SENAB_*` environment variable (or `REDIS_URL`)."""

    # Inputs stay out of validation errors because they may contain API keys or the Redis password.
    model_config = SettingsConfigDict(env_prefix="SENAB_", extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0 picks a free one).")
    model: str | None = Field(
        None, description="Base model: unset for the default SmolLM2-135M-Instruct, a model directory, "
                          "a .gguf file, or a hub id.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto picks bfloat16 on CUDA and on CPUs with native bf16.")
    quantization: Literal["auto", "none", "int4"] = Field(
        "auto", description="Weights of the linear layers: int4 runs them as 4-bit groups of 32 on a CPU in "
                            "bfloat16; auto does so only there and only where that is exact (the default "
                            "model's Q4_1 source), adding bfloat16 copies packed for oneDNN for prompts "
                            "and large batches where the CPU has AMX, and on a CPU in float32 packs the "
                            "dense weights for the compiled AVX2 product (oneDNN where it does not "
                            "serve); none keeps plain dense weights.")
    home: str | None = Field(None, description="Directory for pulled models and bridge checkpoints "
                                               "(default ~/.cache/senab).")
    bridge: str | None = Field(None, description="Bridge checkpoint directory; unset uses the default "
                                                 "(shipped or untrained) checkpoint for the model.")
    redis_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "SENAB_REDIS_URL"),
        description="Redis URL for session state; unset keeps state in process memory.")
    redis_prefix: str = Field("senab", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                              description="Key prefix in Redis.")
    session_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="Idle time after which a session expires, seconds.")
    trajectory_max: int = Field(1000, ge=1, description="Points kept per session trajectory (oldest dropped).")
    max_tokens_default: int = Field(512, ge=1, description="max_tokens when a request sets none.")
    # The SmolLM2-135M-Instruct model card samples with temperature 0.2 and top_p 0.9; at
    # OpenAI's defaults (1.0, 1.0) a 135M model drifts off topic within a few sentences.
    default_temperature: float = Field(
        0.2, ge=0, le=2, description="Temperature when a request sets none (0 is greedy).")
    default_top_p: float = Field(0.9, ge=0, le=1, description="top_p when a request sets none.")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_queue: int = Field(64, ge=1, description="Requests waiting for the model before new ones get 429.")
    max_batch_size: int = Field(16, ge=1, le=256, description="Sequences decoded together in one batch.")
    prefix_cache_mb: int = Field(
        64, ge=0, le=1 << 20, description="Memory for prompt prefixes reused across requests (the layers below the "
                                          "bridge), MiB; 0 switches the cache off.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted, bytes.")
    request_timeout_s: float = Field(600.0, gt=0, description="Maximum time one completion may run, seconds.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json for one JSON object per line with the request fields.")
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys; unset serves without authentication. An entry "
                          "`name:key` keeps the key's sessions under the tenant `name`, so a rotated key can "
                          "keep them; a bare key gets a tenant derived from its hash.")
    # senab.native reads the variable itself. The field is here so that an invalid value stops start-up.
    native_kernels: str = Field("1", description="1 runs the compiled C++ operators where they build, 0 keeps "
                                                 "them off (PyTorch's operations serve).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Largest prompt accepted, in tokens; unset allows up to the model's context.")

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"SENAB_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
        return value

    @field_validator("native_kernels")
    @classmethod
    def _check_native_kernels(cls, value: str) -> str:
        if value.strip().lower() not in {"1", "true", "yes", "on", "", "0", "false", "no", "off"}:
            raise ValueError(f"SENAB_NATIVE_KERNELS must be 1 or 0 (or true/false, yes/no, on/off), got {value!r}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_api_keys(value.get_secret_value())
        return value

    def api_key_tenants(self) -> list[tuple[str, bytes]]:
        """Return (tenant, SHA-256 of the key) for every configured key; empty without keys."""
        return parse_api_keys(self.api_keys.get_secret_value()) if self.api_keys else []

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_tokens_default > self.max_tokens_cap:
            raise ValueError(
                f"SENAB_MAX_TOKENS_DEFAULT ({self.max_tokens_default}) must not exceed "
                f"SENAB_MAX_TOKENS_CAP ({self.max_tokens_cap})"
            )
        return self

    def redacted(self) -> dict[str, object]:
        """Return the settings for the startup log, with the Redis password and API keys hidden."""
        values = self.model_dump()
        values["redis_url"] = redact_url(self.redis_url.get_secret_value()) if self.redis_url else None
        values["api_keys"] = f"{len(self.api_key_tenants())} key(s)" if self.api_keys else None
        return values


_TENANT_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_API_KEY_RE = re.compile(r"[\x21-\x39\x3b-\x7e]{16,}")  # printable ASCII except ':' (0x3a)


def parse_api_keys(value: str) -> list[tuple[str, bytes]]:
    """Parse SENAB_API_KEYS into (tenant, SHA-256 of the key) pairs; errors never echo a key."""
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not entries:
        raise ValueError("SENAB_API_KEYS is set but contains no key; unset it to serve without authentication")
    tenants: list[tuple[str, bytes]] = []
    for position, entry in enumerate(entries, 1):
        name, separator, key = entry.partition(":")
        if not separator:
            name, key = "", entry
        # Clients send the key in an HTTP header, which carries ASCII only; ':' separates the name.
        if not _API_KEY_RE.fullmatch(key):
            raise ValueError(f"SENAB_API_KEYS entry {position} has a key shorter than 16 characters or with "
                             "spaces, ':' or non-ASCII characters; use long random keys, e.g. "
                             "`openssl rand -hex 24`")
        digest = hashlib.sha256(key.encode()).digest()
        if separator and not _TENANT_NAME_RE.fullmatch(name):
            raise ValueError(f"SENAB_API_KEYS entry {position} has an invalid tenant name before ':'; a tenant "
                             "name has 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
        tenants.append((name or "key-" + digest.hex()[:24], digest))
    if len({digest for _, digest in tenants}) != len(tenants):
        raise ValueError("SENAB_API_KEYS lists the same key twice")
    return tenants


def redact_url(url: str) -> str:
    """Replace the password of a URL such as redis://user:pw@host with '***'."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{location}" if ":" in credentials else f"{scheme}://{credentials}@{location}"
