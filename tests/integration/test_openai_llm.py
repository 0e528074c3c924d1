"""The external LLM client against small fake servers: errors, retries, cancellation."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from voicepipe.stages.base import SamplingParams, StageError
from voicepipe.stages.openai_llm import OpenAILLM

from .conftest import free_port


def serve_once(answer: bytes, stall: bool = False) -> Iterator[int]:
    """A server that answers each connection with `answer`, then stalls or closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    conns: list[socket.socket] = []

    def run() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            conn.recv(65536)
            conn.sendall(answer)
            if not stall:
                conn.close()

    threading.Thread(target=run, daemon=True).start()
    yield port
    listener.close()
    for c in conns:
        c.close()


@pytest.fixture
def stalled() -> Iterator[int]:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n'
    yield from serve_once(head + b"%x\r\n%s\r\n" % (len(chunk), chunk), stall=True)


@pytest.fixture
def failing() -> Iterator[int]:
    body = b'{"error":{"message":"model is overloaded"}}'
    yield from serve_once(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body))


def test_cancel_aborts_a_stalled_stream_at_once(stalled: int) -> None:
    conv = OpenAILLM(f"http://127.0.0.1:{stalled}/v1", "m", timeout_s=30).new_conversation("s")
    conv.add_message("user", "hi")
    cancel = threading.Event()
    deltas = conv.generate(SamplingParams(), cancel)
    assert next(deltas) == "Hello"
    threading.Timer(0.2, cancel.set).start()
    t0 = time.perf_counter()
    assert list(deltas) == []  # the read was blocked; the cancel woke it
    assert time.perf_counter() - t0 < 0.6
    assert conv.messages[-1] == {"role": "assistant", "content": "Hello"}


def test_silent_server_times_out(stalled: int) -> None:
    conv = OpenAILLM(f"http://127.0.0.1:{stalled}", "m", timeout_s=0.3).new_conversation("s")
    with pytest.raises(StageError, match="sent nothing"):
        list(conv.generate(SamplingParams(), threading.Event()))
    assert conv.messages[-1] == {"role": "assistant", "content": "Hello"}


def test_http_error_becomes_a_stage_error(failing: int) -> None:
    conv = OpenAILLM(f"http://127.0.0.1:{failing}/v1", "m").new_conversation("s")
    with pytest.raises(StageError, match="HTTP 503: model is overloaded"):
        list(conv.generate(SamplingParams(), threading.Event()))


def test_connect_errors_are_retried_with_backoff() -> None:
    llm = OpenAILLM(f"http://127.0.0.1:{free_port()}/v1", "m", retries=2)
    t0 = time.perf_counter()
    with pytest.raises(StageError, match="cannot connect"):
        list(llm.new_conversation("s").generate(SamplingParams(), threading.Event()))
    assert 0.3 <= time.perf_counter() - t0 < 2.0  # waited 0.1 s, then 0.2 s


def test_slots_are_spread_and_sent_with_cache_prompt() -> None:
    llm = OpenAILLM("http://127.0.0.1:1/v1", "m", slots=2)
    a, b, c = (llm.new_conversation("s") for _ in range(3))
    assert (a.slot, b.slot, c.slot) == (0, 1, 0)
    b.close()
    assert llm.new_conversation("s").slot == 1
    assert b'"id_slot":0,"cache_prompt":true,"messages":' in a.body(SamplingParams())
    assert b"id_slot" not in OpenAILLM("http://h/v1", "m").new_conversation("s").body(
        SamplingParams())
