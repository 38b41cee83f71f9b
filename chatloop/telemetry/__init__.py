"""Metrics, logs and traces of the gateway and the trainer.

- `metrics`: the Prometheus registry (`/metrics` on CHATLOOP_METRICS_PORT)
- `logs`: text or JSON log lines, the turn's ids on each JSON line
- `tracing`: what is on, the turn a task works on, trace ids derived from turn ids
- `hooks`: the decorators the conversation core and the learning loop wear

Off until `configure` (tests, benchmarks) or `start` (`chatloop serve`, `demo`, `scheduler`).
"""

from __future__ import annotations

import logging
from typing import Any

from chatloop.telemetry.tracing import SCOPE, STATE, make_provider, otlp_configured

log = logging.getLogger(__name__)


def configure(*, metrics: bool = False, tracer_provider: Any = None,
              log_ids: bool = False) -> None:
    """Switch metrics on or off and trace with `tracer_provider` (None: no spans); `log_ids`:
    JSON log lines carry the turn's ids (and trace ids derived from it, spans or not). The
    previous provider, if `configure` made it, is flushed first."""
    if STATE.provider is not None and STATE.provider is not tracer_provider:
        STATE.provider.shutdown()
    STATE.metrics = metrics
    STATE.log_ids = log_ids
    STATE.provider = tracer_provider
    STATE.tracer = tracer_provider.get_tracer(SCOPE) if tracer_provider is not None else None


def start(*, service: str, host: str, metrics_port: int, log_format: str,
          salt: str = "") -> Any:
    """What a serving command switches on: metrics (served on `host:metrics_port`; 0: not
    served nor recorded), spans only when they are exported (OTEL_EXPORTER_OTLP_ENDPOINT),
    and the turn's ids on JSON log lines (its trace id derived from the turn id: no span is
    made for it). `salt` (the database's address) makes turn trace
    ids unique per deployment and the same in each of its processes. Returns the metrics
    server (or None)."""
    from chatloop.telemetry import metrics as m

    STATE.salt = f"chatloop:{salt}".encode()[:64]
    exporting = otlp_configured()
    provider = make_provider(service) if exporting else None
    configure(metrics=metrics_port > 0, tracer_provider=provider,
              log_ids=log_format == "json")
    if exporting:
        log.info("traces exported over OTLP")
    return m.serve(host=host, port=metrics_port) if metrics_port > 0 else None


def shutdown() -> None:
    """Export the spans still buffered (at exit)."""
    configure()
