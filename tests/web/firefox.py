"""A minimal WebDriver BiDi driver for Debian's Firefox ESR, for the browser demo's tests.

Playwright cannot drive a stock Firefox, but Firefox has WebDriver BiDi built in: started with
`--remote-debugging-port 0` it prints the port it listens on, and a WebSocket to
`ws://127.0.0.1:PORT/session` takes BiDi commands as JSON (`{"id", "method", "params"}`,
answered by id; events arrive as `{"type": "event", "method", "params"}`). Only what the tests
use is here: a headless Firefox on a throwaway profile with the network quiet and the
microphone allowed, one tab, navigation, JavaScript evaluation (values come back as JSON),
clicks as real pointer input, preload scripts, screenshots, and the page's errors collected
like Playwright's `pageerror` and failed responses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import websockets

from voicepipe.testing import unavailable

LISTENING = re.compile(rb"WebDriver BiDi listening on (ws://\S+)")
# "javascript" log entries are also Firefox's notes on failed connections ("Firefox can't
# establish a connection..."); an exception has a stack trace or reads like one.
EXCEPTION = re.compile(r"(Uncaught )?(\w+\.)?\w*(Error|Exception)\b")
START_TIMEOUT = 60.0  # a cold start on a busy 2-core machine takes several seconds
COMMAND_TIMEOUT = 30.0

# user.js of the throwaway profile: the microphone needs no prompt (the fake device is a tone),
# media may autoplay, audio plays without a sound card, and nothing reaches for the network in
# the background.
PREFS: dict[str, bool | int | str] = {
    "media.navigator.permission.disabled": True,
    "media.navigator.streams.fake": True,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    # The speakers. Without a sound device (a server, a container) an AudioContext never starts:
    # resume() does not resolve. Firefox's mock audio backend is an output device running on
    # the system clock, as headless Chromium's fake audio output is.
    "media.cubeb.force_mock_context": True,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.page": 0,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.newtabpage.enabled": False,
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "app.update.enabled": False,
    "app.update.auto": False,
    "app.normandy.enabled": False,
    "app.shield.optoutstudies.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "services.settings.server": "data:,#remote-settings-disabled/v1",
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.http.speculative-parallel-limit": 0,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.downloads.remote.enabled": False,
    "browser.safebrowsing.provider.google.updateURL": "",
    "browser.safebrowsing.provider.google4.updateURL": "",
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "browser.region.network.url": "",
    "browser.search.update": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "media.gmp-manager.updateEnabled": False,
    "media.gmp-gmpopenh264.enabled": False,
    "geo.provider.network.url": "",
}


class BidiError(RuntimeError):
    """A BiDi command was answered with an error."""


def firefox_path() -> str | None:
    return os.environ.get("VOICEPIPE_FIREFOX") or shutil.which("firefox-esr") or shutil.which(
        "firefox")


def user_js(prefs: dict[str, bool | int | str]) -> str:
    return "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())


class Firefox:
    """One headless Firefox process and its BiDi session (use `launch()`)."""

    def __init__(self, proc: asyncio.subprocess.Process, ws: Any, stderr: deque[str]) -> None:
        self.proc = proc
        self.ws = ws
        self.stderr = stderr  # the last lines Firefox printed, for error messages
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.listeners: list[Any] = []  # callables taking (method, params)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if msg.get("type") == "event":
                    for listener in list(self.listeners):
                        listener(msg["method"], msg["params"])
                    continue
                fut = self.pending.pop(msg.get("id"), None)
                if fut is None or fut.done():
                    continue
                if msg.get("type") == "error":
                    fut.set_exception(BidiError(
                        f"{msg.get('error')}: {msg.get('message')}".strip()))
                else:
                    fut.set_result(msg.get("result"))
        except websockets.ConnectionClosed:
            pass
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(BidiError("the BiDi connection closed; firefox said: "
                                                + " | ".join(self.stderr)))
            self.pending.clear()

    async def command(self, method: str, params: dict[str, Any] | None = None,
                      timeout: float = COMMAND_TIMEOUT) -> Any:
        """Send one command; returns its result, raises BidiError on an error answer."""
        id_ = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[id_] = fut
        await self.ws.send(json.dumps({"id": id_, "method": method, "params": params or {}}))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BidiError(f"{method} got no answer in {timeout} s") from None
        finally:
            self.pending.pop(id_, None)

    async def new_page(self, width: int = 720, height: int = 900) -> Page:
        """The first tab, sized `width` x `height` CSS pixels, collecting the page's errors."""
        tree = await self.command("browsingContext.getTree", {"maxDepth": 0})
        contexts = tree["contexts"]
        if contexts:
            context = contexts[0]["context"]
        else:
            context = (await self.command("browsingContext.create", {"type": "tab"}))["context"]
        page = Page(self, context)
        await page.set_viewport_size({"width": width, "height": height})
        self.listeners.append(page._on_event)
        await self.command("session.subscribe", {
            "events": ["log.entryAdded", "network.responseCompleted"], "contexts": [context]})
        return page

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, prefs: dict[str, bool | int | str] | None = None
                     ) -> AsyncIterator[Firefox]:
        """A headless Firefox on a fresh profile; skips (fails in CI) when it is missing."""
        exe = firefox_path()
        if exe is None:
            unavailable("firefox-esr is not installed (apt-get install firefox-esr)")
        assert exe is not None
        profile = Path(tempfile.mkdtemp(prefix="voicepipe-firefox-"))
        (profile / "user.js").write_text(user_js({**PREFS, **(prefs or {})}))
        env = {**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1", "MOZ_HEADLESS": "1"}
        proc = await asyncio.create_subprocess_exec(
            exe, "--headless", "--no-remote", "--profile", str(profile),
            "--remote-debugging-port", "0", "about:blank",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, start_new_session=True)  # its own process group, killed as a whole
        stderr: deque[str] = deque(maxlen=30)
        drain: asyncio.Task[None] | None = None
        ws = None
        browser = None
        try:
            url = await _listening_url(proc, stderr)
            drain = asyncio.create_task(_drain(proc, stderr))
            ws = await websockets.connect(url + "/session", max_size=None, ping_interval=None,
                                          open_timeout=START_TIMEOUT)
            browser = cls(proc, ws, stderr)
            await browser.command("session.new", {"capabilities": {}})
            yield browser
        finally:
            if browser is not None:
                with contextlib.suppress(Exception):
                    await browser.command("session.end", timeout=5)
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()
            if browser is not None:
                browser.reader.cancel()
            await _kill(proc)
            if drain is not None:
                drain.cancel()
            shutil.rmtree(profile, ignore_errors=True)


async def _listening_url(proc: asyncio.subprocess.Process, stderr: deque[str]) -> str:
    """Read Firefox's stderr until it says where BiDi listens."""
    assert proc.stderr is not None

    async def scan() -> str:
        assert proc.stderr is not None
        while True:
            line = await proc.stderr.readline()
            if not line:
                raise RuntimeError(f"firefox exited ({await proc.wait()}) before listening: "
                                   + " | ".join(stderr))
            stderr.append(line.decode(errors="replace").rstrip())
            m = LISTENING.search(line)
            if m:
                return m.group(1).decode()

    try:
        return await asyncio.wait_for(scan(), START_TIMEOUT)
    except TimeoutError:
        raise RuntimeError(f"firefox did not start WebDriver BiDi in {START_TIMEOUT} s: "
                           + " | ".join(stderr)) from None


async def _drain(proc: asyncio.subprocess.Process, stderr: deque[str]) -> None:
    """Keep reading stderr so that Firefox never blocks on a full pipe."""
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        stderr.append(line.decode(errors="replace").rstrip())


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """End Firefox's whole process group (its content processes too): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), wait)
        except TimeoutError:
            continue
        # the main process is gone; make sure no child of its group lingers
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


class Page:
    """One browsing context (tab). `errors` collects uncaught exceptions and HTTP errors."""

    def __init__(self, browser: Firefox, context: str) -> None:
        self.browser = browser
        self.context = context
        self.errors: list[str] = []
        self.console: list[str] = []

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "log.entryAdded":
            text = params.get("text") or ""
            if params.get("type") == "javascript" and (
                    params.get("stackTrace") or EXCEPTION.match(text)):
                self.errors.append(f"exception: {text}")  # uncaught, or a rejection unhandled
            elif params.get("level") == "error":  # console.error, and Firefox's network notes
                self.console.append(text)
                print("console:", text)
        elif method == "network.responseCompleted":
            if params.get("context") != self.context:
                return
            response = params.get("response") or {}
            if response.get("status", 0) >= 400:
                self.errors.append(f"HTTP {response['status']} {response.get('url')}")

    async def add_init_script(self, function_declaration: str) -> str:
        """Run `function_declaration` (a JS function, called without arguments) in every
        document of this tab before the page's own scripts; returns the preload script id."""
        result = await self.browser.command("script.addPreloadScript", {
            "functionDeclaration": function_declaration, "contexts": [self.context]})
        return str(result["script"])

    async def goto(self, url: str) -> None:
        await self.browser.command("browsingContext.navigate", {
            "context": self.context, "url": url, "wait": "complete"})

    async def evaluate(self, expression: str, *, user_activation: bool = False) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), as JSON."""
        result = await self.browser.command("script.callFunction", {
            "functionDeclaration": f"async () => JSON.stringify(await ({expression}\n))",
            "target": {"context": self.context}, "awaitPromise": True,
            "resultOwnership": "none", "userActivation": user_activation})
        if result.get("type") == "exception":
            details = result.get("exceptionDetails") or {}
            raise BidiError(f"JavaScript error in {expression!r}: {details.get('text')}")
        value = result["result"]
        return json.loads(value["value"]) if value.get("type") == "string" else None

    async def click(self, selector: str) -> None:
        """A left click at the middle of the element, as pointer input (a user gesture)."""
        box = await self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return {{x: Math.round(r.left + r.width / 2), y: Math.round(r.top + r.height / 2)}};
        }})()""")
        if box is None:
            raise BidiError(f"no element matches {selector!r}")
        await self.browser.command("input.performActions", {
            "context": self.context, "actions": [{
                "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                "actions": [
                    {"type": "pointerMove", "x": box["x"], "y": box["y"]},
                    {"type": "pointerDown", "button": 0},
                    {"type": "pointerUp", "button": 0}]}]})

    async def inner_text(self, selector: str) -> str:
        return str(await self.evaluate(
            f"document.querySelector({json.dumps(selector)}).innerText"))

    async def set_viewport_size(self, size: dict[str, int]) -> None:
        await self.browser.command("browsingContext.setViewport", {
            "context": self.context, "viewport": size})

    async def screenshot(self, path: str | Path, *, full_page: bool = False) -> Path:
        """Save a PNG of the viewport, or of the whole document."""
        result = await self.browser.command("browsingContext.captureScreenshot", {
            "context": self.context, "origin": "document" if full_page else "viewport",
            "format": {"type": "image/png"}})
        path = Path(path)
        path.write_bytes(base64.b64decode(result["data"]))
        return path


@contextlib.asynccontextmanager
async def firefox_page(*, width: int = 720, height: int = 900,
                       prefs: dict[str, bool | int | str] | None = None
                       ) -> AsyncIterator[Page]:
    """A fresh headless Firefox with one tab, closed (the process group killed) on exit."""
    async with Firefox.launch(prefs) as browser:
        yield await browser.new_page(width, height)
