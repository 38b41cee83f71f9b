"""compose.yaml's observability profile, the Prometheus config and the Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from chatloop.telemetry.metrics import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exposed_names() -> set[str]:
    """Every sample name /metrics can show for chatloop's metric families."""
    return {family.name + suffix for metric in FAMILIES for family in metric.describe()
            for suffix in SUFFIXES[family.type]}


def test_the_observability_profile_scrapes_the_gateway_and_the_trainer() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:")  # never on a public interface
    for name in ("gateway", "trainer"):
        assert "9464" in services[name]["expose"]
        assert all("9464" not in str(p) for p in services[name].get("ports", []))
    mounts = [v.split(":")[0] for v in services["prometheus"]["volumes"]]
    assert "./deploy/prometheus.yml" in mounts
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"]
               for c in job["static_configs"] for t in c["targets"]}
    assert {"gateway:9464", "trainer:9464"} <= targets
    for mount in services["grafana"]["volumes"]:
        source = mount.split(":")[0]
        assert source.startswith("./") is False or (ROOT / source).is_dir()


def test_the_dashboard_is_valid_and_refers_to_existing_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/chatloop.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    series = [re.sub(r"\bby \([^)]*\)", "", e) for e in exprs]  # label names out
    used = {name for e in series for name in re.findall(r"\b(?:chatloop|gen_ai)_[a-z_]+", e)}
    known = exposed_names()
    assert used <= known, f"unknown metrics in the dashboard: {sorted(used - known)}"
    families = {f.name for m in FAMILIES for f in m.describe()}
    shown = {f for f in families if any(n.startswith(f) for n in used)}
    assert shown == families, f"not on the dashboard: {sorted(families - shown)}"
    provisioning = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/chatloop.yml").read_text())
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
