"""deploy/nginx/voicepipe.conf in front of two `voicepipe serve` replicas on loopback.

Conversations opened through nginx spread over both replicas, and each one stays on its
replica for its lifetime: the session id of `session.created` and the response ids of its
turns are all logged by the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import voicepipe_client as vc

from .conftest import Voicepipe, free_port

pytestmark = pytest.mark.slow
CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "voicepipe.conf"


def site_config(backends: list[int], listen: int) -> str:
    """The deployed file with the test's ports in place of the example ones."""
    text = CONF.read_text()
    ports = iter(backends)
    text, n = re.subn(r"server 127\.0\.0\.1:\d+", lambda _: f"server 127.0.0.1:{next(ports)}",
                      text)
    assert n == len(backends), "the example upstream should list two replicas"
    text, n = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen};", text)
    assert n == 1
    return text


MAIN = """\
worker_processes 1;
pid nginx.pid;
error_log error.log info;
events { worker_connections 256; }
http {
    access_log access.log;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    include voicepipe.conf;
}
"""


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Voicepipe]]:
    started = [Voicepipe("--stages", "scripted", "--threads", "1") for _ in range(2)]
    try:
        yield [vp.wait_ready(120) for vp in started]
    finally:
        for vp in started:
            vp.stop()


@pytest.fixture(scope="module")
def nginx(nginx_bin: str, replicas: list[Voicepipe],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "tmp").mkdir()
    port = free_port()
    (prefix / "voicepipe.conf").write_text(site_config([vp.port for vp in replicas], port))
    (prefix / "nginx.conf").write_text(MAIN)
    proc = subprocess.Popen([nginx_bin, "-p", str(prefix), "-c", "nginx.conf",
                             "-g", "daemon off;"], stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"nginx did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)
    try:
        yield f"ws://127.0.0.1:{port}/v1/realtime"
    finally:
        proc.terminate()
        proc.wait(10)


def owner(replicas: list[Voicepipe], ident: str) -> int:
    """Index of the one replica whose log names `ident`."""
    found = [i for i, vp in enumerate(replicas) if ident in vp.log()]
    assert len(found) == 1, (ident, found)
    return found[0]


def test_conversations_spread_over_replicas_and_stay_put(nginx: str,
                                                          replicas: list[Voicepipe]) -> None:
    async def conversation(rt: vc.Realtime) -> list[str]:
        """Two text turns; the response ids."""
        ids = []
        for question in ("Hello?", "Still there?"):
            await rt.add_message(question)
            await rt.create_response(modalities=["text"])
            async with asyncio.timeout(30):
                while (ev := await rt.recv()).type != "response.done":
                    pass
            assert ev.data["response"]["status"] == "completed", ev.data
            ids.append(ev.data["response"]["id"])
            await asyncio.sleep(0.3)
        return ids

    async def run() -> tuple[list[str], list[list[str]], list[str], list[dict]]:  # type: ignore[type-arg]
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(vc.connect(nginx)) for _ in range(4)]
            sessions = [str(rt.session_id) for rt in clients]
            upstreams = [rt.ws.response.headers.get("X-Voicepipe-Upstream", "")
                         for rt in clients]
            health = [vp.healthz() for vp in replicas]
            turns = await asyncio.gather(*(conversation(rt) for rt in clients))
            return sessions, list(turns), upstreams, health

    sessions, turns, upstreams, health = asyncio.run(run())
    # nginx spread the four open conversations over both replicas
    assert [h["sessions"] for h in health] == [2, 2], health
    for session_id, response_ids, upstream in zip(sessions, turns, upstreams, strict=True):
        home = owner(replicas, session_id)
        assert upstream == f"127.0.0.1:{replicas[home].port}", (upstream, home)
        # every turn of the conversation ran on the replica that created the session
        end = time.monotonic() + 10  # the log lines may trail the events a little
        while not all(i in replicas[home].log() for i in response_ids):
            assert time.monotonic() < end, (response_ids, replicas[home].log()[-2000:])
            time.sleep(0.05)
        assert all(owner(replicas, i) == home for i in response_ids)
