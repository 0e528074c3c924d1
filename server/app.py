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
import signal
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

from .connection import Connection

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
    sessions: set[Connection] = field(default_factory=set)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="stage"))

    # ---- HTTP --------------------------------------------------------------------------------

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == REALTIME_PATH:
            return self._check_upgrade(request)
        if path == "/healthz":
            return self._healthz()
        return self._static(path)

    def _check_upgrade(self, request: Request) -> Response | None:
        if self.config.api_keys and not self._authorized(request.headers):
            return _json(HTTPStatus.UNAUTHORIZED, {"error": {
                "type": "invalid_request_error", "code": "invalid_api_key",
                "message": "missing or invalid API key"}})
        if self.stages is None:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": {
                "type": "server_error", "code": "not_ready",
                "message": f"models are {self.status}; see /healthz"}})
        if len(self.sessions) >= self.config.max_sessions:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": {
                "type": "server_error", "code": "too_many_sessions",
                "message": f"the server holds its limit of {self.config.max_sessions} sessions"}})
        return None

    def _authorized(self, headers: Headers) -> bool:
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
        ok = False
        for key in offered:
            for valid in self.config.api_keys:
                ok |= hmac.compare_digest(key.encode(), valid.encode())
        return ok

    def _healthz(self) -> Response:
        body: dict[str, Any] = {"status": self.status, "sessions": len(self.sessions)}
        if self.stages is not None:
            body["models"] = self.stages.info
        if self.error:
            body["error"] = self.error
        code = HTTPStatus.OK if self.status == "ready" else HTTPStatus.SERVICE_UNAVAILABLE
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
        conn = Connection(
            ws, self.stages, executor=self.executor,
            dialect=dialect,
            max_message_bytes=self.config.max_message_bytes,
            max_buffer_s=self.config.max_input_buffer_s,
            partial_interval_ms=self.config.partial_interval_ms,
            max_response_tokens=self.config.max_response_tokens)
        self.sessions.add(conn)
        log.info("session %s opened (%d active)", conn.session.id, len(self.sessions))
        try:
            await conn.run()
        finally:
            self.sessions.discard(conn)
            log.info("session %s closed (%d active)", conn.session.id, len(self.sessions))

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
        server.close()
        await server.wait_closed()
        app.executor.shutdown(wait=False, cancel_futures=True)


mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
