"""The server's one configuration object: defaults, a TOML file, environment, command line.

Every option is a field of `ServerConfig` with its help text; `voicepipe serve --help` and the
README's option table are generated from these fields. Later sources override earlier ones:
defaults < `--config FILE` (TOML) < `VOICEPIPE_<NAME>` environment variables < flags.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voicepipe import models


class ConfigError(ValueError):
    """An option has a bad value; the message names the option and its source."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0 for all interfaces).")
    port: int = _opt(8765, "TCP port for HTTP and WebSocket (0 picks a free one).")
    api_keys: tuple[str, ...] = _opt(
        (), "API keys accepted from 'Authorization: Bearer' or the browser subprotocol "
        "'openai-insecure-api-key.<key>'; empty means no authentication. Comma-separated in "
        "the environment and on the command line."
    )
    allowed_origins: tuple[str, ...] = _opt(
        (), "Browser origins allowed to open sessions (e.g. https://app.example.com); empty "
        "allows any. Requests without an Origin header (non-browser clients) are always allowed."
    )
    metrics_key: str = _opt("", "If set, GET /metrics needs 'Authorization: Bearer <key>'.")
    stages: str = _opt(
        "default", "'default' runs the configured models; 'scripted' keeps the real VAD and "
        "replaces ASR, LLM and TTS with instant deterministic stand-ins (a fixed transcript, a "
        "fixed reply, 100 ms of tone per phrase), to load-test the server itself."
    )
    device: str = _opt("auto", "Where models run: 'auto' (CUDA when present), 'cpu' or 'cuda'.")
    vad_model: str = _opt(models.DEFAULT_VAD, "Voice activity model (path or offline name).")
    asr_model: str = _opt(models.DEFAULT_ASR, "faster-whisper model (path, offline name or hub id).")
    asr_compute_type: str = _opt(
        "auto", "CTranslate2 compute type for ASR: auto (int8 on CPU, float16 on CUDA), int8, "
        "float16, float32."
    )
    llm_model: str = _opt(models.DEFAULT_LLM, "LLM: a GGUF file, a Hugging Face folder, an "
                          "offline name or a hub id.")
    llm_url: str = _opt(
        "", "Base URL of an external OpenAI-compatible server (vLLM, SGLang, llama.cpp), e.g. "
        "http://10.0.0.5:8000/v1; when set, replies are streamed from its /chat/completions "
        "instead of the embedded engine, and llm_model is the model name sent to it (left at "
        "its default, the server's first model from /models is used)."
    )
    llm_api_key: str = _opt("", "Bearer token sent to llm_url (empty: none).")
    llm_connect_timeout_s: float = _opt(2.0, "Seconds to wait for a connection to llm_url.")
    llm_timeout_s: float = _opt(
        30.0, "Seconds llm_url may stay silent (before the first token or between two) before "
        "the turn fails with an error event."
    )
    llm_retries: int = _opt(
        2, "Connection attempts to llm_url repeated after a connect error, with backoff from "
        "0.1 s doubling; a request that was sent is never repeated."
    )
    llm_slots: int = _opt(
        0, "llama.cpp llama-server only: its --parallel slot count. Each conversation is pinned "
        "to a slot (id_slot) with cache_prompt, so sessions keep their prompt cached; 0 sends "
        "neither field (vLLM, SGLang, llama-cpp-python)."
    )
    llm_dtype: str = _opt("auto", "LLM weights: auto (int8 weights on the CPU, bfloat16 on CUDA), "
                          "int8, float32, bfloat16, float16.")
    kv_cache_gb: float = _opt(0.0, "Size of the LLM's KV page pool in GB (0: 10% of memory up "
                              "to 1 GB on the CPU, half the free GPU memory on CUDA).")
    kv_page_tokens: int = _opt(16, "Tokens per KV page (prefix matching stays exact to the "
                               "token whatever the size).")
    kv_dtype: str = _opt(
        "auto", "LLM KV cache: auto (bfloat16 on a CPU with AVX512-BF16 and a C compiler, where a "
        "fused bf16 attention kernel halves the KV memory and the attention time over long "
        "histories; else the activations' dtype), float32, bfloat16 (CPU only)."
    )
    tts_model: str = _opt(models.DEFAULT_TTS, "Piper voice (.onnx with its .onnx.json beside it, "
                          "or offline name).")
    threads: int = _opt(0, "CPU threads for model inference (0: all cores).")
    max_sessions: int = _opt(32, "Concurrent WebSocket sessions; more are refused with HTTP 503.")
    max_sessions_per_key: int = _opt(0, "Concurrent sessions per API key (0: no per-key limit).")
    max_message_bytes: int = _opt(1 << 20, "Largest client WebSocket message accepted, in bytes.")
    max_events_per_s: float = _opt(
        200.0, "Client events per second per session (sustained; bursts of twice as many are "
        "allowed); events beyond it are dropped with a rate_limit_exceeded error."
    )
    max_conversation_items: int = _opt(
        200, "Conversation items kept per session; beyond it the oldest are dropped (the "
        "system prompt stays) and the LLM's cache follows."
    )
    idle_timeout_s: float = _opt(
        600.0, "Close a session after this long without any client message (0: never)."
    )
    max_send_buffer_bytes: int = _opt(
        8 << 20, "Server-to-client bytes allowed to queue for a client that does not read; "
        "beyond it the session is closed (1008) so it cannot grow the server's memory."
    )
    shutdown_grace_s: float = _opt(
        10.0, "On SIGTERM, how long replies in flight may finish before sessions are closed."
    )
    max_input_buffer_s: float = _opt(
        120.0, "Most input audio held uncommitted (seconds); beyond it the session gets an error "
        "and the buffer is cleared."
    )
    max_response_tokens: int = _opt(256, "Upper bound on tokens in one reply.")
    partial_interval_ms: int = _opt(
        600, "How often partial transcripts are made while the user speaks (0 turns them off)."
    )
    speculative_reply: bool = _opt(
        True, "Start the reply during the end-of-turn silence, once the final transcript is in, "
        "holding its audio until the endpoint (dropped if the user goes on); off: the reply "
        "starts at the endpoint, after only the speculative prefill."
    )
    web_root: str = _opt("", "Folder served at / (the browser demo); empty: the bundled demo.")
    log_level: str = _opt("info", "Logging level: debug, info, warning, error.")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu or cuda[:N]")
        if self.stages not in ("default", "scripted"):
            raise ConfigError(f"stages: {self.stages!r} is not 'default' or 'scripted'")
        for name in ("max_sessions", "max_message_bytes", "max_response_tokens",
                     "max_conversation_items", "max_send_buffer_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.max_input_buffer_s <= 0:
            raise ConfigError("max_input_buffer_s: must be positive")
        if self.kv_cache_gb < 0 or self.kv_page_tokens < 1:
            raise ConfigError("kv_cache_gb must not be negative and kv_page_tokens must be >= 1")
        if self.kv_dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"kv_dtype: {self.kv_dtype!r} is not auto, float32 or bfloat16")
        if self.max_events_per_s <= 0:
            raise ConfigError("max_events_per_s: must be positive")
        if min(self.idle_timeout_s, self.shutdown_grace_s, self.max_sessions_per_key) < 0:
            raise ConfigError("idle_timeout_s, shutdown_grace_s and max_sessions_per_key must "
                              "not be negative")
        if self.llm_url and not self.llm_url.startswith(("http://", "https://")):
            raise ConfigError(f"llm_url: {self.llm_url!r} is not an http(s) URL")
        if min(self.llm_connect_timeout_s, self.llm_timeout_s) <= 0:
            raise ConfigError("llm_connect_timeout_s and llm_timeout_s must be positive")
        if min(self.llm_retries, self.llm_slots) < 0:
            raise ConfigError("llm_retries and llm_slots must not be negative")
        if self.threads < 0 or self.partial_interval_ms < 0:
            raise ConfigError("threads and partial_interval_ms must not be negative")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: {self.log_level!r} is not debug/info/warning/error")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"


FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else str(f.type)
    try:
        if kind.startswith("tuple"):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} (from {source}): {value!r} is not a valid {kind}") from None


def load(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ServerConfig:
    """Build the config from the TOML file, the environment and explicit overrides."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        data = data.get("server", data)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"config file {path}: unknown option {key!r}")
            values[name] = _coerce(name, value, str(path))
    env = os.environ if environ is None else environ
    for name in FIELDS:
        key = "VOICEPIPE_" + name.upper()
        if key in env:
            values[name] = _coerce(name, env[key], key)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    return ServerConfig(**values)
