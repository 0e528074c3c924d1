"""The LLM stage backed by an external OpenAI-compatible server (vLLM, SGLang, llama.cpp).

Each conversation streams `POST {url}/chat/completions` with `stream: true`. Two things make it
fast on the server's side:

- **Byte-stable prompts.** The request carries the conversation's messages exactly as they were
  sent before, plus the reply exactly as it was streamed (or cut by a barge-in), serialized the
  same way every turn, so the chat template renders a prompt whose every earlier byte is
  unchanged and the server's prefix cache (vLLM's automatic prefix caching, SGLang's radix
  cache, llama.cpp's per-slot prompt cache) holds all but the new turn.
- **llama.cpp slots.** With `slots > 0` (the `--parallel` of the C++ `llama-server`), each
  conversation is pinned to one slot (`id_slot`) and asks the server to keep the prompt there
  (`cache_prompt`), so concurrent conversations do not evict each other's prompt.
  llama-cpp-python's `llama_cpp.server` has no slots and ignores both fields: it keeps one KV
  cache (the last prompt's) and, started with `--cache true`, a RAM cache of whole states keyed
  by prompt; see docs/deployment.md.

The HTTP client is the standard library's. A barge-in sets the `cancel` event; a watcher thread
then shuts the socket down, which wakes the blocked read at once and makes the server see the
client go away and stop decoding. Connect errors are retried with exponential backoff; anything
after the request was sent is not (the server may already be generating). Failures raise
`StageError`, which the session reports as an `error` event before going on.

`prefill()` is a no-op: the protocol has no "prefill only" request, and a `max_tokens=1`
request to warm the prefix cache costs a full request on a server that may be serializing
them (llama-cpp-python runs one at a time), while the real request starts as soon as the
transcript is final anyway.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Generator, Iterator
from typing import Any

from voicepipe.stages.base import GenerationStats, SamplingParams, StageError

log = logging.getLogger("voicepipe.llm")

_CONNECT_ERRORS = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError,
                   socket.gaierror, TimeoutError)


class _Abort:
    """Shuts down a request's socket as soon as `cancel` is set, until `finish()`."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._watch, name="llm-cancel", daemon=True)
        self._thread.start()

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
        if self.cancel.is_set():
            self._shutdown()

    def _watch(self) -> None:
        # A short wait in a loop: the thread must also end when the request ends uncancelled.
        while not self._done.is_set():
            if self.cancel.wait(0.05):
                self._shutdown()
                return

    def _shutdown(self) -> None:
        with self._lock:
            if self._sock is not None:
                # shutdown, not close: it wakes the reader's recv() at once, and the reader's
                # thread closes the descriptor itself, so it cannot be reused under its feet.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._done.set()


class OpenAILLM:
    """A client of one OpenAI-compatible server; one object serves every session."""

    def __init__(self, url: str, model: str = "", api_key: str = "", *,
                 connect_timeout_s: float = 2.0, timeout_s: float = 30.0, retries: int = 2,
                 slots: int = 0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"llm_url: {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        path = parts.path.rstrip("/")
        self._base = path if path else "/v1"
        self.model = model
        self.api_key = api_key
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.retries = retries
        self.slots = slots
        self._slot_users = [0] * slots
        self._lock = threading.Lock()

    def new_conversation(self, instructions: str) -> OpenAIConversation:
        return OpenAIConversation(self, instructions)

    def warmup(self) -> None:
        """Learn the served model name when none was given; a server that is down is only
        logged, so voicepipe starts and reports errors turn by turn until it is back."""
        try:
            self.model_name()
        except StageError as exc:
            log.warning("%s", exc)

    def model_name(self) -> str:
        with self._lock:
            if self.model:
                return self.model
        status, data = self._request("GET", "/models", None, threading.Event())
        try:
            name = json.loads(data)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise StageError("llm", f"{self.url}/models answered HTTP {status} without a "
                             "model; set llm_model") from None
        with self._lock:
            self.model = str(name)
        return self.model

    # ---- llama.cpp slots -----------------------------------------------------------------------

    def take_slot(self) -> int | None:
        """The least shared slot, or None when slots are not in use."""
        if not self.slots:
            return None
        with self._lock:
            slot = min(range(self.slots), key=self._slot_users.__getitem__)
            self._slot_users[slot] += 1
        return slot

    def release_slot(self, slot: int | None) -> None:
        if slot is not None:
            with self._lock:
                self._slot_users[slot] -= 1

    # ---- HTTP ----------------------------------------------------------------------------------

    def _connect(self, abort: _Abort) -> http.client.HTTPConnection:
        """A connected socket, retrying connect errors with exponential backoff."""
        delay = 0.1
        for attempt in range(self.retries + 1):
            conn: http.client.HTTPConnection
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port,
                                                   timeout=self.connect_timeout_s)
            else:
                conn = http.client.HTTPConnection(self._host, self._port,
                                                  timeout=self.connect_timeout_s)
            try:
                conn.connect()
            except _CONNECT_ERRORS as exc:
                conn.close()
                if attempt == self.retries or abort.cancel.wait(delay):
                    raise StageError("llm", f"cannot connect to {self.url}: "
                                     f"{type(exc).__name__}: {exc}") from exc
                delay *= 2
                continue
            assert conn.sock is not None
            conn.sock.settimeout(self.timeout_s)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            abort.attach(conn.sock)
            return conn
        raise AssertionError("unreachable")

    def _headers(self, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json",
                   "Accept": "text/event-stream" if stream else "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, body: bytes | None,
                 cancel: threading.Event) -> tuple[int, bytes]:
        abort = _Abort(cancel)
        conn: http.client.HTTPConnection | None = None
        try:
            conn = self._connect(abort)
            conn.request(method, self._base + path, body=body, headers=self._headers(False))
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise StageError("llm", f"{method} {self.url}{path}: {type(exc).__name__}: "
                             f"{exc}") from exc
        finally:
            abort.finish()
            if conn is not None:
                conn.close()

    def stream(self, body: bytes, cancel: threading.Event,
               stats: GenerationStats) -> Generator[str, None, None]:
        """POST a streaming chat completion and yield its text deltas until it ends or
        `cancel` is set; usage figures, when the server reports them, go into `stats`."""
        abort = _Abort(cancel)
        conn: http.client.HTTPConnection | None = None
        try:
            try:
                conn = self._connect(abort)
            except StageError:
                if cancel.is_set():
                    return
                raise
            try:
                conn.request("POST", self._base + "/chat/completions", body=body,
                             headers=self._headers(True))
                resp = conn.getresponse()
                if resp.status >= 400:
                    raise StageError("llm", f"{self.url}/chat/completions answered HTTP "
                                     f"{resp.status}: {_error_text(resp.read(65536))}")
                finished = False
                while not cancel.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    if not line.startswith(b"data:"):
                        continue  # blank separators, ": ping" comments, "event:" names
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        finished = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise StageError("llm", f"{self.url}: {_error_text(data)}")
                    _read_usage(chunk, stats)
                    for choice in chunk.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        if choice.get("finish_reason"):
                            finished = True
                        if delta and not cancel.is_set():
                            if not chunk.get("usage"):
                                stats.generated_tokens += 1
                            yield delta
                if not finished and not cancel.is_set():
                    raise StageError("llm", f"the stream from {self.url} ended before the "
                                     "reply did")
            except TimeoutError as exc:
                if cancel.is_set():
                    return
                raise StageError("llm", f"{self.url} sent nothing for {self.timeout_s:g}s") \
                    from exc
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if cancel.is_set():
                    return  # our own shutdown of the socket
                raise StageError("llm", f"the stream from {self.url} broke off: "
                                 f"{type(exc).__name__}: {exc}") from exc
        finally:
            abort.finish()
            if conn is not None:
                conn.close()


def _read_usage(chunk: dict[str, Any], stats: GenerationStats) -> None:
    usage = chunk.get("usage")
    if usage:  # OpenAI / vLLM / SGLang: the last chunk, with stream_options.include_usage
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        stats.cached_tokens = cached
        stats.prefill_tokens = max(0, (usage.get("prompt_tokens") or 0) - cached)
        stats.generated_tokens = usage.get("completion_tokens") or stats.generated_tokens
    timings = chunk.get("timings")
    if timings:  # llama-server reports what its slot cache held
        stats.cached_tokens = timings.get("cache_n", stats.cached_tokens)
        stats.prefill_tokens = timings.get("prompt_n", stats.prefill_tokens)


def _error_text(data: bytes) -> str:
    try:
        err = json.loads(data)
        err = err.get("error", err) if isinstance(err, dict) else err
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    except ValueError:
        return data.decode("utf-8", "replace")[:500]


class OpenAIConversation:
    """One session's messages, sent whole with every request (the server caches the prefix)."""

    def __init__(self, llm: OpenAILLM, instructions: str) -> None:
        self.llm = llm
        self.messages: list[dict[str, str]] = [{"role": "system", "content": instructions}]
        self.slot = llm.take_slot()
        self.requests = 0
        self._stats = GenerationStats()

    def add_message(self, role: str, text: str) -> None:
        self.messages.append({"role": role, "content": text})

    def prefill(self) -> int:
        """Nothing to run ahead of time on a remote server (see the module docstring)."""
        return 0

    def body(self, params: SamplingParams) -> bytes:
        """The request, serialized the same way every turn; the messages come last, so the
        bytes of everything said before are a prefix of the next request's messages."""
        req: dict[str, Any] = {"model": self.llm.model_name(), "stream": True,
                               "stream_options": {"include_usage": True},
                               "max_tokens": params.max_tokens,
                               "temperature": params.temperature}
        if params.top_p < 1.0:
            req["top_p"] = params.top_p
        if params.top_k > 0:
            req["top_k"] = params.top_k
        if params.seed is not None:
            req["seed"] = params.seed
        if params.repetition_penalty != 1.0:
            req["repetition_penalty"] = params.repetition_penalty  # vLLM, SGLang
            req["repeat_penalty"] = params.repetition_penalty  # llama.cpp
        if params.stop:
            req["stop"] = list(params.stop)
        if self.slot is not None:
            req["id_slot"] = self.slot
            req["cache_prompt"] = True
        req["messages"] = self.messages
        return json.dumps(req, ensure_ascii=False, separators=(",", ":")).encode()

    def generate(self, params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        self._stats = stats = GenerationStats()
        if cancel.is_set() or params.max_tokens <= 0:
            self.messages.append({"role": "assistant", "content": ""})
            return
        body = self.body(params)
        reply = {"role": "assistant", "content": ""}
        self.messages.append(reply)
        self.requests += 1
        parts: list[str] = []
        t0 = time.perf_counter()
        try:
            with contextlib.closing(self.llm.stream(body, cancel, stats)) as deltas:
                for delta in deltas:
                    parts.append(delta)
                    yield delta
        finally:
            reply["content"] = "".join(parts)  # exactly as streamed: the next prompt's bytes
            log.debug("llm request %d: %d deltas in %.3fs%s", self.requests, len(parts),
                      time.perf_counter() - t0, " (cancelled)" if cancel.is_set() else "")

    def truncate_last_assistant(self, kept_text: str) -> None:
        """Cut the last assistant message to its longest common prefix with `kept_text`."""
        for msg in reversed(self.messages):
            if msg["role"] == "assistant":
                content = msg["content"]
                n = 0
                while n < min(len(content), len(kept_text)) and content[n] == kept_text[n]:
                    n += 1
                msg["content"] = content[:n]
                return
        raise ValueError("there is no assistant message to truncate")

    def set_instructions(self, text: str) -> None:
        self.messages[0] = {"role": "system", "content": text}

    def delete_message(self, index: int) -> None:
        del self.messages[index + 1]

    @property
    def stats(self) -> GenerationStats:
        return self._stats

    def close(self) -> None:
        self.llm.release_slot(self.slot)
        self.slot = None
