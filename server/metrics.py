"""Server observability: the Prometheus metrics behind `GET /metrics`, and optional traces.

Each `App` owns one `ServerMetrics` with its own registry (never the process-wide default), so
several servers in one process keep separate figures. Connections report what happened through
a few calls (`turn_finished`, `event`, `error`, `token`); gauges that describe the present
(active sessions, GPU memory) are read when the page is scraped.

Traces: when the OpenTelemetry API is installed and tracing is configured (a tracer provider set
by `opentelemetry-instrument`, or `OTEL_TRACES_EXPORTER` / `OTEL_EXPORTER_OTLP_*` in the
environment with the SDK installed), every finished turn becomes one `voicepipe.turn` span with
a child span per stage, built after the fact from the turn's marks.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from voicepipe.latency import TurnTimings

__all__ = ["CONTENT_TYPE", "ServerMetrics", "stage_spans", "tracer_from_env"]

log = logging.getLogger("voicepipe.server")

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   10.0, 30.0)
# asr_latency is negative when the final transcription, started at the first silent frame,
# finished before the endpoint, and llm_ttft when a speculative reply's first token did. A
# histogram with negative buckets has no _sum, so they have their own.
SIGNED_FIGURES = ("asr_latency", "llm_ttft")
SIGNED_BUCKETS = (-1.0, -0.5, -0.3, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0,
                  5.0)
TOKEN_BUCKETS = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class ServerMetrics:
    """The figures of one server. Cheap to call from the event loop: no I/O, no locks held."""

    def __init__(self, tracer: Any | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.figures = Histogram(
            "voicepipe_turn_latency_seconds",
            "Derived latency figures of each turn (DESIGN.md vocabulary)",
            ["figure"], buckets=LATENCY_BUCKETS, registry=r)
        self.signed_figures = Histogram(
            "voicepipe_turn_signed_latency_seconds",
            "Derived latency figures that can be negative (asr_latency); no _sum",
            ["figure"], buckets=SIGNED_BUCKETS, registry=r)
        self.marks = Histogram(
            "voicepipe_turn_mark_seconds",
            "Time of each mark of a turn after its speech_end mark",
            ["mark"], buckets=LATENCY_BUCKETS, registry=r)
        self.turns = Counter("voicepipe_turns", "Finished turns (responses) by status",
                             ["status"], registry=r)
        self.barge_ins = Counter("voicepipe_barge_ins",
                                 "Replies the user talked over (cancelled or cut)", registry=r)
        self.errors = Counter("voicepipe_errors", "error events sent, by code", ["code"],
                              registry=r)
        self.speculative_replies = Counter(
            "voicepipe_speculative_replies",
            "Replies started during the end-of-turn silence, by outcome: adopted at the "
            "endpoint, or dropped (the user went on; their tokens were wasted work)",
            ["outcome"], registry=r)
        self.active_sessions = Gauge("voicepipe_active_sessions", "Open Realtime sessions",
                                     registry=r)
        self.prefill_tokens = Counter("voicepipe_llm_prefill_tokens",
                                      "Prompt tokens the LLM computed (not found in the cache)",
                                      registry=r)
        self.cached_tokens = Counter("voicepipe_llm_cached_tokens",
                                     "Prompt tokens served from the prefix cache", registry=r)
        self.decode_tokens = Counter("voicepipe_llm_decode_tokens", "Generated tokens",
                                     registry=r)
        self.turn_prefill = Histogram("voicepipe_llm_turn_prefill_tokens",
                                      "Prompt tokens computed per turn", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.cache_hit_ratio = Gauge(
            "voicepipe_llm_prefix_cache_hit_ratio",
            "cached / (cached + prefill) prompt tokens since start", registry=r)
        self.inter_token = Histogram("voicepipe_llm_inter_token_latency_seconds",
                                     "Time between consecutive tokens of a reply",
                                     buckets=ITL_BUCKETS, registry=r)
        self.kv_pages = Gauge("voicepipe_llm_kv_pages", "KV cache pages, when the LLM has a pool",
                              ["state"], registry=r)
        r.register(_CudaCollector())
        self.tracer = tracer if tracer is not None else tracer_from_env()
        self._cut_items: deque[str] = deque(maxlen=256)  # counts a barge-in once per item
        self._prompt_tokens = [0, 0]  # cached, computed: for the hit ratio

    # ---- calls from the connection ----------------------------------------------------------

    def turn_finished(self, timings: TurnTimings, status: str,
                      response_id: str | None = None) -> None:
        self.turns.labels(status).inc()
        for name, ms in timings.derived_ms().items():
            family = self.signed_figures if name in SIGNED_FIGURES else self.figures
            family.labels(name).observe(ms / 1000.0)
        start = timings.marks.get("speech_end")
        if start is not None:
            for name, when in timings.marks.items():
                if name != "speech_end":
                    self.marks.labels(name).observe(when - start)
        self.prefill_tokens.inc(timings.prefill_tokens)
        self.cached_tokens.inc(timings.cached_tokens)
        self.decode_tokens.inc(timings.generated_tokens)
        self._prompt_tokens[0] += timings.cached_tokens
        self._prompt_tokens[1] += timings.prefill_tokens
        if timings.prefill_tokens or timings.cached_tokens:
            self.turn_prefill.observe(timings.prefill_tokens)
        if self.tracer is not None:
            try:
                _trace_turn(self.tracer, timings, status, response_id)
            except Exception:  # tracing must never break a session
                log.exception("tracing a turn failed")

    def event(self, ev: dict[str, Any]) -> None:
        """A server event the session sends: counts errors and barge-ins."""
        kind = ev.get("type")
        if kind == "error":
            self.error(str((ev.get("error") or {}).get("code") or "unknown"))
        elif kind == "response.done":
            resp = ev.get("response") or {}
            details = resp.get("status_details") or {}
            if resp.get("status") == "cancelled" and details.get("reason") == "turn_detected":
                items = [o.get("id") for o in resp.get("output") or [] if isinstance(o, dict)]
                self._barge_in(items[0] if items else None)
        elif kind == "conversation.item.truncated":
            self._barge_in(ev.get("item_id"))

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def token(self, previous: float | None) -> float:
        """A token arrived now; `previous` is the time of the one before (None for the first).
        Returns now, to pass back with the next token."""
        now = time.perf_counter()
        if previous is not None:
            self.inter_token.observe(now - previous)
        return now

    # ---- the page --------------------------------------------------------------------------

    def render(self, active_sessions: int, llm: Any = None) -> bytes:
        """The Prometheus text page. `llm` may offer `kv_pages() -> (used, free)`."""
        self.active_sessions.set(active_sessions)
        cached, computed = self._prompt_tokens
        total = cached + computed
        self.cache_hit_ratio.set(cached / total if total else 0.0)
        pages = getattr(llm, "kv_pages", None)
        if callable(pages):
            used, free = pages()
            self.kv_pages.labels("used").set(used)
            self.kv_pages.labels("free").set(free)
        return generate_latest(self.registry)

    def http_response(self, request: Request, key: str, active_sessions: int,
                      llm: Any = None) -> Response:
        """`GET /metrics`; with a non-empty `key`, only for `Authorization: Bearer <key>`."""
        if key and not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                           f"Bearer {key}".encode()):
            body = json.dumps({"error": {"type": "invalid_request_error",
                                         "code": "invalid_metrics_key",
                                         "message": "GET /metrics needs the metrics key"}})
            return Response(401, "Unauthorized",
                            Headers([("Content-Type", "application/json")]), body.encode())
        return Response(200, "OK", Headers([("Content-Type", CONTENT_TYPE)]),
                        self.render(active_sessions, llm))

    def _barge_in(self, item_id: str | None) -> None:
        if item_id is not None:
            if item_id in self._cut_items:
                return
            self._cut_items.append(item_id)
        self.barge_ins.inc()


class _CudaCollector(Collector):
    """GPU memory and utilization per device, read at scrape time, only when CUDA is up."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")  # never import torch just to find it absent
        if torch is None or not torch.cuda.is_available():
            return
        alloc = GaugeMetricFamily("voicepipe_gpu_memory_allocated_bytes",
                                  "Memory held by tensors", labels=["device"])
        reserved = GaugeMetricFamily("voicepipe_gpu_memory_reserved_bytes",
                                     "Memory held by the caching allocator", labels=["device"])
        util = GaugeMetricFamily("voicepipe_gpu_utilization_ratio",
                                 "Share of the last sample period a kernel ran (NVML)",
                                 labels=["device"])
        for i in range(torch.cuda.device_count()):
            dev = str(i)
            alloc.add_metric([dev], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([dev], float(torch.cuda.memory_reserved(i)))
            try:
                util.add_metric([dev], torch.cuda.utilization(i) / 100.0)
            except Exception:  # needs pynvml; memory figures still count
                pass
        yield alloc
        yield reserved
        if util.samples:
            yield util


# ---- OpenTelemetry -----------------------------------------------------------------------------

def stage_spans(timings: TurnTimings) -> list[tuple[str, float, float]]:
    """(stage, start, end) wall-clock intervals of a turn, from the marks it has.

    The final transcription starts at the first silent frame, before the endpoint, so the
    `asr` span runs from the end of speech; the LLM waits for both the transcript and the
    endpoint."""
    m = timings.marks
    ready = max((m[k] for k in ("asr_final", "endpoint") if k in m), default=None)
    spans = []
    for name, a, b in (("endpointing", m.get("speech_end"), m.get("endpoint")),
                       ("asr", m.get("speech_end"), m.get("asr_final")),
                       ("llm_first_token", ready, m.get("llm_first_token")),
                       ("tts_first_audio", m.get("llm_first_token"), m.get("tts_first_audio")),
                       ("send", m.get("tts_first_audio"), m.get("first_byte_sent"))):
        if a is not None and b is not None:
            spans.append((name, a, max(a, b)))
    return spans


def _ns(t: float) -> int:
    return int(t * 1e9)


def _trace_turn(tracer: Any, timings: TurnTimings, status: str, response_id: str | None) -> None:
    from opentelemetry import trace

    m = timings.marks
    if not m:
        return
    start, end = min(m.values()), max(m.values())
    attrs: dict[str, Any] = {f"voicepipe.mark.{k}": v for k, v in m.items()}
    attrs.update({f"voicepipe.{k}_ms": v for k, v in timings.derived_ms().items()})
    attrs.update({"voicepipe.status": status,
                  "voicepipe.llm.prefill_tokens": timings.prefill_tokens,
                  "voicepipe.llm.cached_tokens": timings.cached_tokens,
                  "voicepipe.llm.generated_tokens": timings.generated_tokens})
    if response_id:
        attrs["voicepipe.response_id"] = response_id
    turn = tracer.start_span("voicepipe.turn", start_time=_ns(start), attributes=attrs)
    ctx = trace.set_span_in_context(turn)
    for name, a, b in stage_spans(timings):
        child = tracer.start_span(f"voicepipe.{name}", context=ctx, start_time=_ns(a),
                                  attributes={"voicepipe.duration_ms": (b - a) * 1000.0})
        child.end(end_time=_ns(b))
    turn.end(end_time=_ns(end))


def tracer_from_env() -> Any | None:
    """A tracer when OpenTelemetry is installed and configured, else None (no tracing)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        env = os.environ
        wanted = env.get("OTEL_TRACES_EXPORTER", "")
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT")
        if wanted in ("", "none") and not endpoint:
            return None
        configured = _sdk_provider(wanted or "otlp")
        if configured is None:
            return None
        trace.set_tracer_provider(configured)
        provider = configured
    return provider.get_tracer("voicepipe")


def _sdk_provider(exporter_name: str) -> Any | None:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_* is set but opentelemetry-sdk is not installed: no traces")
        return None
    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("OTLP tracing asked for but no opentelemetry-exporter-otlp: no "
                            "traces")
                return None
        exporter = OTLPSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME", "voicepipe")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider

