"""The Prometheus metrics of the gateway and the trainer, on one registry served at /metrics.

Names follow the OpenTelemetry GenAI semantic conventions in Prometheus form (`.` -> `_`, the
unit as a suffix): `gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds`,
`gen_ai_client_operation_time_to_first_chunk_seconds`; chatloop's own are `chatloop_*`.
Nothing is recorded until `telemetry.configure(metrics=True)` (the commands that serve do it).

Every turn updates about a dozen series, so recording is kept to a plain addition: a family
keeps its series as numbers (`Family.labels(...)` finds a series once; `inc`, `dec`, `set` and
`observe` change it under the family's lock) and prometheus-client reads them only when
/metrics is scraped (each family is a custom collector on `REGISTRY`). The exposition is
prometheus-client's own: counters as `NAME_total`, histograms as cumulative `le` buckets with
`_sum` and `_count`.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import Any, Literal

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # CPU, memory, open files of this process


class Series:
    """One counter's or gauge's series: a number."""

    __slots__ = ("_lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock, self.value = lock, 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Buckets:
    """One histogram's series: a count per bucket (the last one +Inf) and the sum."""

    __slots__ = ("_bounds", "_lock", "counts", "sum")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock, self._bounds = lock, bounds
        self.counts, self.sum = [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)  # the first bound >= value: `le` is inclusive
        with self._lock:
            self.counts[i] += 1
            self.sum += value


class Family:
    """A labelled counter, gauge or histogram, collected by `REGISTRY` at each scrape."""

    def __init__(self, kind: Literal["counter", "gauge", "histogram"], name: str, doc: str,
                 labelnames: Sequence[str], *, buckets: Sequence[float] = (),
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.kind, self.name, self.doc = kind, name, doc
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        if kind == "histogram" and list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{name}: buckets must be increasing")
        self._les = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        """The series of these label values (made at first use)."""
        try:
            return self._series[values]
        except KeyError:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}"
                                 ) from None
            made = (Buckets(self._lock, self.buckets) if self.kind == "histogram"
                    else Series(self._lock))
            return self._series.setdefault(tuple(str(v) for v in values), made)

    def clear(self) -> None:
        """Drop every series (a gauge whose label sets change, like the canary's)."""
        with self._lock:
            self._series = {}

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        with self._lock:
            rows = [(labels, series.value if self.kind != "histogram"
                     else (list(series.counts), series.sum))
                    for labels, series in self._series.items()]
        for labels, value in rows:
            if self.kind == "histogram":
                counts, total = value
                family.add_metric(labels, list(zip(self._les, accumulate(counts), strict=True)),
                                  sum_value=total)
            else:
                family.add_metric(labels, value)
        yield family

    def _family(self) -> Metric:
        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                 "histogram": HistogramMetricFamily}
        return kinds[self.kind](self.name, self.doc, labels=self.labelnames)


# bucket boundaries recommended by the GenAI semantic conventions
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
GEN_AI = ("gen_ai_operation_name", "gen_ai_request_model", "adapter")

TOKEN_USAGE = Family(
    "histogram",
    "gen_ai_client_token_usage", "Tokens used per inference call, by token type (input, "
    "output) and model (the adapter's name, or the base model's)",
    [*GEN_AI, "gen_ai_token_type"], buckets=TOKEN_BUCKETS)
OPERATION_DURATION = Family(
    "histogram",
    "gen_ai_client_operation_duration_seconds", "Inference call duration (request to the end "
    "of the stream); error_type is set on failures", [*GEN_AI, "error_type"],
    buckets=DURATION_BUCKETS)
TIME_TO_FIRST_CHUNK = Family(
    "histogram",
    "gen_ai_client_operation_time_to_first_chunk_seconds", "Inference request to its first "
    "streamed text", GEN_AI, buckets=DURATION_BUCKETS)
TURNS = Family(
    "counter",
    "chatloop_turns", "Inbound messages by channel and outcome (answered, failed, duplicate, "
    "command, rejected, cancelled)", ["channel", "outcome"])
TURNS_IN_FLIGHT = Family(
    "gauge",
    "chatloop_turns_in_flight", "Answers being generated or delivered now", ["channel"])
FEEDBACK = Family(
    "counter",
    "chatloop_feedback", "Votes and corrections by channel, kind (vote, correction), rating "
    "(up, down, none) and the adapter that answered (base: the base model)",
    ["channel", "kind", "rating", "adapter"])
PLATFORM_CALLS = Family(
    "counter",
    "chatloop_platform_api_calls", "Chat platform API calls by method and status (the HTTP "
    "status, 429 for flood control, `network` when no response came, Slack's error code when "
    "it answered ok=false)", ["channel", "method", "status"])
EVENTS_RESUMED = Family(
    "counter",
    "chatloop_events_resumed", "Unfinished events resumed after a crash or restart",
    ["channel"])
EVENTS_GIVEN_UP = Family(
    "counter",
    "chatloop_events_given_up", "Events closed as failed after failing every resume",
    ["channel"])
TRAINING_RUNS = Family(
    "counter",
    "chatloop_training_runs", "Learning-loop cycles by outcome (succeeded, rejected, skipped, "
    "failed, busy)", ["outcome"])
GATE_FAILURES = Family(
    "counter",
    "chatloop_gate_failures", "Evaluation-gate checks a candidate adapter failed", ["check"])
CANARY_VOTES = Family(
    "gauge",
    "chatloop_canary_votes", "Judged answers of the canary and of the active adapter (the "
    "control) at the last canary evaluation, by rating", ["adapter", "arm", "rating"])
CANARY_HANDOFFS = Family(
    "gauge",
    "chatloop_canary_handoffs", "Answers of the canary and of the active adapter (the control) "
    "at the last canary evaluation, and how many a hand-off to a person followed (the hand-off "
    "rate the canary is judged by beside the 👎 rate)", ["adapter", "arm", "kind"])
CANARY_DECISIONS = Family(
    "counter",
    "chatloop_canary_decisions", "Canary evaluations by decision (wait, promote, rollback)",
    ["decision"])
HANDOFFS = Family(
    "counter",
    "chatloop_handoffs", "Conversations handed to a person, by channel, reason (button, "
    "command, phrase, downvotes) and the adapter of the bot's last answer (base: the base "
    "model; divided by that adapter's answers: its hand-off rate)",
    ["channel", "reason", "adapter"])

# the metric families every scrape shows (the dashboard and its test refer to these)
FAMILIES = (TOKEN_USAGE, OPERATION_DURATION, TIME_TO_FIRST_CHUNK, TURNS, TURNS_IN_FLIGHT,
            FEEDBACK, PLATFORM_CALLS, EVENTS_RESUMED, EVENTS_GIVEN_UP, TRAINING_RUNS,
            GATE_FAILURES, CANARY_VOTES, CANARY_DECISIONS, CANARY_HANDOFFS)


def serve(*, host: str, port: int) -> Any:
    """Serve /metrics on `host:port` from a daemon thread (not the gateway's public port);
    returns the server (`.shutdown()`), or None if the port cannot be bound."""
    try:
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:  # the service itself still runs: say so loudly
        log.error("cannot serve metrics on %s:%s: %s", host, port, exc)
        return None
    log.info("metrics on http://%s:%s/metrics", host, port)
    return server
