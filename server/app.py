"""HTTP routes and the WebSocket endpoint: `/v1/realtime`, `/healthz` and the demo at `/`.

The server listens before the models are loaded, so `/healthz` can report progress; Realtime
connections are refused with 503 until every stage is loaded and warm.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import mimetypes
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from voicepipe import protocol as p
from voicepipe.config import ServerConfig
from voicepipe.stages.base import Stages
from voicepipe.stages.batching import VADBatcher

from .connection import Connection
from .metrics import ServerMetrics

log = logging.getLogger("voicepipe.server")
KEY_PROTOCOL = "openai-insecure-api-key."
REALTIME_PATH = "/v1/realtime"


def bundled_web_root() -> Path:
    import voicepipe.web

    return Path(list(voicepipe.web.__path__)[0])


@dataclass
class App:
    config: ServerConfig
    stages: Stages | None = None
    status: str = "loading"
    error: str | None = None
    draining: bool = False
    degraded: dict[str, str] = field(default_factory=dict)  # stage -> failure, logged once
    sessions: set[Connection] = field(default_factory=set)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    # Stage calls and each session's conversation lane. A reply holds a thread while it streams
    # (the engine batches the decode steps of all of them), and a transcription may run beside
    # it, so there are two per session: a full server never queues one reply behind another.
    # Threads start on demand.
    executor: ThreadPoolExecutor = field(init=False)
    _vad_batcher: VADBatcher | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=2 * self.config.max_sessions + 4,
                                           thread_name_prefix="stage")

    @property
    def vad_batcher(self) -> VADBatcher:
        """One thread runs every session's VAD frames, batched (made for the loaded stages)."""
        assert self.stages is not None
        if self._vad_batcher is None or self._vad_batcher.vad is not self.stages.vad:
            self._vad_batcher = VADBatcher(self.stages.vad)
        return self._vad_batcher

    # ---- HTTP --------------------------------------------------------------------------------

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == REALTIME_PATH:
            return self._check_upgrade(request)
        if path == "/healthz":
            return self._healthz()
        if path == "/metrics":
            return self.metrics.http_response(request, self.config.metrics_key, len(self.sessions),
                                              self.stages.llm if self.stages else None)
        return self._static(path)

    def _check_upgrade(self, request: Request) -> Response | None:
        origin = request.headers.get("Origin")
        if origin and self.config.allowed_origins and origin not in self.config.allowed_origins:
            return _json(HTTPStatus.FORBIDDEN, {"error": {
                "type": "invalid_request_error", "code": "origin_not_allowed",
                "message": f"origin {origin} is not allowed"}})
        key = self.api_key_of(request.headers)
        if self.config.api_keys and key is None:
            return _json(HTTPStatus.UNAUTHORIZED, {"error": {
                "type": "invalid_request_error", "code": "invalid_api_key",
                "message": "missing or invalid API key"}})
        if self.draining:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": {
                "type": "server_error", "code": "shutting_down",
                "message": "the server is shutting down"}})
        limit = self.config.max_sessions_per_key
        if key is not None and limit and sum(c.api_key == key for c in self.sessions) >= limit:
            return _json(HTTPStatus.TOO_MANY_REQUESTS, {"error": {
                "type": "invalid_request_error", "code": "too_many_sessions_for_key",
                "message": f"this API key already holds its limit of {limit} sessions"}})
        if self.stages is None:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": {
                "type": "server_error", "code": "not_ready",
                "message": f"models are {self.status}; see /healthz"}})
        if len(self.sessions) >= self.config.max_sessions:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": {
                "type": "server_error", "code": "too_many_sessions",
                "message": f"the server holds its limit of {self.config.max_sessions} sessions"}})
        return None

    def api_key_of(self, headers: Headers) -> str | None:
        """The configured API key the request presents, if any."""
        offered: list[str] = []
        auth = headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        for value in headers.get_all("Sec-WebSocket-Protocol"):
            for proto in value.split(","):
                proto = proto.strip()
                if proto.startswith(KEY_PROTOCOL):
                    offered.append(proto[len(KEY_PROTOCOL):])
        # compare against every key so timing does not tell which one nearly matched
        found = None
        for key in offered:
            for valid in self.config.api_keys:
                if hmac.compare_digest(key.encode(), valid.encode()):
                    found = valid
        return found

    def _healthz(self) -> Response:
        status = "degraded" if self.status == "ready" and self.degraded else self.status
        body: dict[str, Any] = {"status": status, "sessions": len(self.sessions),
                                "process": process_stats()}
        if self.stages is not None:
            body["models"] = self.stages.info
        if self.error:
            body["error"] = self.error
        if self.degraded:
            body["degraded"] = self.degraded
        code = HTTPStatus.OK if status == "ready" else HTTPStatus.SERVICE_UNAVAILABLE
        return _json(code, body)

    def _static(self, path: str) -> Response:
        root = Path(self.config.web_root) if self.config.web_root else bundled_web_root()
        rel = path.lstrip("/") or "index.html"
        target = (root / rel).resolve()
        if root.resolve() not in target.parents or not target.is_file():
            return _json(HTTPStatus.NOT_FOUND, {"error": {"code": "not_found",
                                                          "message": f"no such path {path}"}})
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return Response(200, "OK", Headers([("Content-Type", ctype),
                                            ("Cache-Control", "no-cache")]), target.read_bytes())

    # ---- WebSocket ---------------------------------------------------------------------------

    @staticmethod
    def select_subprotocol(conn: ServerConnection, offered: list[str]) -> str | None:
        if "realtime" in offered:
            return "realtime"
        return next((o for o in offered if not o.startswith(KEY_PROTOCOL)), None)

    async def handle(self, ws: ServerConnection) -> None:
        assert self.stages is not None
        dialect = p.dialect_from_header(ws.request.headers.get("OpenAI-Beta") if ws.request
                                        else None)
        conn = Connection(ws, self.stages, self.config, executor=self.executor,
                          vad_batcher=self.vad_batcher, dialect=dialect, on_fatal=self.stage_failed)
        conn.api_key = self.api_key_of(ws.request.headers) if ws.request else None
        conn.metrics = self.metrics
        self.sessions.add(conn)
        log.info("session %s opened (%d active)", conn.session.id, len(self.sessions))
        try:
            await conn.run()
        finally:
            self.sessions.discard(conn)
            log.info("session %s closed (%d active)", conn.session.id, len(self.sessions))

    def stage_failed(self, stage: str, exc: BaseException) -> None:
        """A stage failed in a way that will not heal by itself (out of memory, say)."""
        if stage not in self.degraded:
            log.error("stage %s cannot recover: %s: %s; /healthz reports degraded", stage,
                      type(exc).__name__, exc)
            self.degraded[stage] = f"{type(exc).__name__}: {exc}"

    async def shutdown(self, grace_s: float) -> None:
        """Stop taking sessions, let replies in flight finish (up to `grace_s`), then close
        every session with 1001."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.session.busy for c in self.sessions) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(c.ws.close(1001, "server shutting down")
                               for c in list(self.sessions)), return_exceptions=True)

    def close(self) -> None:
        """Release the worker threads once the server is closed."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._vad_batcher is not None:
            self._vad_batcher.close()

    async def load(self, loader: Callable[[], Stages]) -> None:
        try:
            self.stages = await asyncio.get_running_loop().run_in_executor(None, loader)
            self.status = "ready"
        except Exception as exc:
            log.exception("loading the models failed")
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    async def start(self) -> Server:
        # Messages up to 4x the event limit are read and answered with an error event; larger
        # ones close the connection (1009), so one client cannot make the server buffer more.
        return await serve(
            self.handle, self.config.host, self.config.port,
            process_request=self.process_request,
            select_subprotocol=self.select_subprotocol,
            max_size=4 * self.config.max_message_bytes + 4096,
            server_header="voicepipe",
        )


def _json(status: HTTPStatus, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    return Response(status.value, status.phrase, Headers(
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]), data)


def process_stats() -> dict[str, Any]:
    """Resident memory, asyncio tasks and threads of this process (for load tests)."""
    rss = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        pass
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = 0
    return {"rss_bytes": rss, "tasks": tasks, "threads": threading.active_count()}


def bound_port(server: Server) -> int:
    return int(next(iter(server.sockets)).getsockname()[1])


async def run(config: ServerConfig, loader: Callable[[], Stages],
              ready: Callable[[str], None] | None = None) -> None:
    """Listen, load the stages, announce the URL, and serve until SIGINT/SIGTERM."""
    app = App(config)
    server = await app.start()
    port = bound_port(server)
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    log.info("listening on %s:%d (loading models; /healthz reports progress)", config.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        loader_task = asyncio.create_task(app.load(loader))
        done, _ = await asyncio.wait({loader_task, asyncio.create_task(stop.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if loader_task in done:
            loader_task.result()
            url = f"http://{host}:{port}/"
            if ready:
                ready(url)
            await stop.wait()
    finally:
        log.info("shutting down: %d sessions, up to %.0fs for replies in flight",
                 len(app.sessions), config.shutdown_grace_s)
        server.close(close_connections=False)  # stop listening; sessions go on for now
        await app.shutdown(config.shutdown_grace_s)
        await server.wait_closed()
        app.close()


mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
