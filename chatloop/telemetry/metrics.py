"""The Prometheus metrics of the gateway and the trainer, on one registry served at /metrics.

Names follow the OpenTelemetry GenAI semantic conventions in Prometheus form (`.` -> `_`, the
unit as a suffix): `gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds`,
`gen_ai_client_operation_time_to_first_chunk_seconds`; chatloop's own are `chatloop_*`.
Nothing is recorded until `telemetry.configure(metrics=True)` (the commands that serve do it).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

log = logging.getLogger(__name__)
disable_created_metrics()  # no `_created` series beside every counter and histogram

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # CPU, memory, open files of this process

# bucket boundaries recommended by the GenAI semantic conventions
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
GEN_AI = ("gen_ai_operation_name", "gen_ai_request_model", "adapter")

TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage", "Tokens used per inference call, by token type (input, "
    "output) and model (the adapter's name, or the base model's)",
    [*GEN_AI, "gen_ai_token_type"], buckets=TOKEN_BUCKETS, registry=REGISTRY)
OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds", "Inference call duration (request to the end "
    "of the stream); error_type is set on failures", [*GEN_AI, "error_type"],
    buckets=DURATION_BUCKETS, registry=REGISTRY)
TIME_TO_FIRST_CHUNK = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds", "Inference request to its first "
    "streamed text", GEN_AI, buckets=DURATION_BUCKETS, registry=REGISTRY)
TURNS = Counter(
    "chatloop_turns", "Inbound messages by channel and outcome (answered, failed, duplicate, "
    "command, rejected, cancelled)", ["channel", "outcome"], registry=REGISTRY)
TURNS_IN_FLIGHT = Gauge(
    "chatloop_turns_in_flight", "Answers being generated or delivered now", ["channel"],
    registry=REGISTRY)
FEEDBACK = Counter(
    "chatloop_feedback", "Votes and corrections by channel, kind (vote, correction), rating "
    "(up, down, none) and the adapter that answered (base: the base model)",
    ["channel", "kind", "rating", "adapter"], registry=REGISTRY)
PLATFORM_CALLS = Counter(
    "chatloop_platform_api_calls", "Chat platform API calls by method and status (the HTTP "
    "status, 429 for flood control, `network` when no response came, Slack's error code when "
    "it answered ok=false)", ["channel", "method", "status"], registry=REGISTRY)
EVENTS_RESUMED = Counter(
    "chatloop_events_resumed", "Unfinished events resumed after a crash or restart",
    ["channel"], registry=REGISTRY)
EVENTS_GIVEN_UP = Counter(
    "chatloop_events_given_up", "Events closed as failed after failing every resume",
    ["channel"], registry=REGISTRY)
TRAINING_RUNS = Counter(
    "chatloop_training_runs", "Learning-loop cycles by outcome (succeeded, rejected, skipped, "
    "failed, busy)", ["outcome"], registry=REGISTRY)
GATE_FAILURES = Counter(
    "chatloop_gate_failures", "Evaluation-gate checks a candidate adapter failed", ["check"],
    registry=REGISTRY)
CANARY_VOTES = Gauge(
    "chatloop_canary_votes", "Judged answers of the canary and of the active adapter (the "
    "control) at the last canary evaluation, by rating", ["adapter", "arm", "rating"],
    registry=REGISTRY)
CANARY_HANDOFFS = Gauge(
    "chatloop_canary_handoffs", "Answers of the canary and of the active adapter (the control) "
    "at the last canary evaluation, and how many a hand-off to a person followed (the hand-off "
    "rate the canary is judged by beside the 👎 rate)", ["adapter", "arm", "kind"],
    registry=REGISTRY)
CANARY_DECISIONS = Counter(
    "chatloop_canary_decisions", "Canary evaluations by decision (wait, promote, rollback)",
    ["decision"], registry=REGISTRY)
HANDOFFS = Counter(
    "chatloop_handoffs", "Conversations handed to a person, by channel, reason (button, "
    "command, phrase, downvotes) and the adapter of the bot's last answer (base: the base "
    "model; divided by that adapter's answers: its hand-off rate)",
    ["channel", "reason", "adapter"], registry=REGISTRY)

# the metric families every scrape shows (the dashboard and its test refer to these)
FAMILIES = (TOKEN_USAGE, OPERATION_DURATION, TIME_TO_FIRST_CHUNK, TURNS, TURNS_IN_FLIGHT,
            FEEDBACK, PLATFORM_CALLS, EVENTS_RESUMED, EVENTS_GIVEN_UP, TRAINING_RUNS,
            GATE_FAILURES, CANARY_VOTES, CANARY_DECISIONS, CANARY_HANDOFFS)


_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, kept: the per-turn metrics look their children up once (only
    for metrics never `.clear()`ed, whose children stay registered)."""
    try:
        return _CHILDREN[(metric, labels)]
    except KeyError:
        found = _CHILDREN[(metric, labels)] = metric.labels(*labels)
        return found


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
