"""Real processes on loopback: llama-cpp-python's server, `voicepipe serve`, nginx.

A `RecordingProxy` sits between voicepipe and the LLM server: it records every request byte for
byte (the prompts), can slow the stream down (so a barge-in lands mid-stream) and shows whether
a stream was cut by the client before the server finished it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from voicepipe.testing import unavailable

READY = re.compile(r"voicepipe is ready: open (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Exchange:
    """One proxied connection: what the client sent and what the server answered."""

    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    client_closed_first: bool = False

    @property
    def body(self) -> bytes:
        return bytes(self.sent).partition(b"\r\n\r\n")[2]

    @property
    def completed(self) -> bool:
        return b"data: [DONE]" in self.received


class RecordingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0  # per server-to-client read of 256 bytes, to slow a stream down
        self.on_reply: Callable[[], object] | None = None  # called once, at a reply's first bytes
        self.exchanges: list[Exchange] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def chat_requests(self) -> list[Exchange]:
        return [x for x in self.exchanges if x.sent.startswith(b"POST ")]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            x = Exchange()
            self.exchanges.append(x)
            threading.Thread(target=self._pump, args=(client, upstream, x, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, x, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, x: Exchange, up: bool) -> None:
        try:
            while data := src.recv(256 if self.delay_s and not up else 65536):
                if up:
                    x.sent += data
                else:
                    if self.on_reply is not None and x.sent.startswith(b"POST "):
                        hook, self.on_reply = self.on_reply, None
                        hook()
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    x.received += data
                dst.sendall(data)
        except OSError:
            pass
        if up and not x.completed:
            x.client_closed_first = True
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()


def _has_llama_server() -> bool:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server, restartable on the same port."""

    def __init__(self, model: str, port: int) -> None:
        self.model = model
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", self.model,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
             "--n_threads", "1", "--interrupt_requests", "false", "--verbose", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("llama_cpp.server exited at start") from None
                time.sleep(0.2)
        else:
            raise RuntimeError("llama_cpp.server did not start")
        # The first completion after a start is slow (weights paged in): do it here.
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 4}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                     body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout):
            pass

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def llama() -> Iterator[LlamaServer]:
    if not _has_llama_server():
        unavailable("llama-cpp-python[server] is not installed")
    from voicepipe import models

    server = LlamaServer(str(models.resolve("smollm2-135m-instruct-q4_1")), free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def proxy(llama: LlamaServer) -> Iterator[RecordingProxy]:
    p = RecordingProxy(llama.port)
    yield p
    p.close()


class Voicepipe:
    """`voicepipe serve` as a subprocess; its log lines are kept (they name sessions)."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voicepipe.server.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.http = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := READY.search(line):
                self.http = m.group(1).rstrip("/")
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 300.0) -> Voicepipe:
        self._ready.wait(timeout)
        if not self.http:
            self.stop()
            raise RuntimeError("voicepipe serve did not start:\n" + "".join(self.lines[-30:]))
        return self

    @property
    def ws(self) -> str:
        return self.http.replace("http://", "ws://", 1) + "/v1/realtime"

    @property
    def port(self) -> int:
        return int(self.http.rsplit(":", 1)[1])

    def healthz(self) -> dict[str, object]:
        with urllib.request.urlopen(self.http + "/healthz", timeout=5) as r:
            return dict(json.loads(r.read()))

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    path = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)
    if path is None:
        unavailable("nginx is not installed (apt-get install -y nginx)")
    return path
