"""/metrics on prometheus_client: the page operators scrape, line for line."""

import math

import prometheus_client
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gatewayd.core.metrics import Metrics, Sample
from gatewayd.testing import gw_client
from tests import plugin_everything


def sample_registry() -> Metrics:
    m = Metrics()
    failures = m.counter("gatewayd_auth_failures_total", "Device authentication failures", ("family", "scheme"))
    failures.inc(family="meter", scheme="jwt")
    failures.inc(2, family="meter", scheme="api_key")
    failures.inc(family="alpha", scheme="jwt")
    m.counter("gatewayd_rule_errors_total", "Rule evaluations that raised (a bug)")
    m.gauge("gatewayd_test_level", "A level").set(-2.5)
    m.collector("gatewayd_serial_bytes_total", "counter", "Bytes through serial lines", lambda: [
        Sample("gatewayd_serial_bytes_total", {"link": "a", "direction": "in"}, 42),
        Sample("gatewayd_serial_bytes_total", {"link": "a", "direction": "out"}, 7),
    ])
    m.collector("gatewayd_outbox_records", "gauge", "Records waiting in the outbox, per class",
                lambda: [Sample("gatewayd_outbox_records", {"class": "history"}, 3)])
    m.collector("gatewayd_sync_last_success_timestamp_seconds", "gauge", "When a sink last delivered a batch",
                lambda: [Sample("gatewayd_sync_last_success_timestamp_seconds", {"sink": "cloud"}, 1700000000.5)])
    m.collector("gatewayd_mqtt_edge_connections", "gauge", "Device connections open at the edge", lambda: [])
    return m


def test_the_page_line_for_line():
    """Families sorted by name, label sets sorted, labels sorted within a sample, HELP and
    TYPE under the exposed name, values as Go floats, no `_created` series."""
    assert sample_registry().render() == """\
# HELP gatewayd_auth_failures_total Device authentication failures
# TYPE gatewayd_auth_failures_total counter
gatewayd_auth_failures_total{family="alpha",scheme="jwt"} 1.0
gatewayd_auth_failures_total{family="meter",scheme="api_key"} 2.0
gatewayd_auth_failures_total{family="meter",scheme="jwt"} 1.0
# HELP gatewayd_mqtt_edge_connections Device connections open at the edge
# TYPE gatewayd_mqtt_edge_connections gauge
# HELP gatewayd_outbox_records Records waiting in the outbox, per class
# TYPE gatewayd_outbox_records gauge
gatewayd_outbox_records{class="history"} 3.0
# HELP gatewayd_rule_errors_total Rule evaluations that raised (a bug)
# TYPE gatewayd_rule_errors_total counter
gatewayd_rule_errors_total 0.0
# HELP gatewayd_serial_bytes_total Bytes through serial lines
# TYPE gatewayd_serial_bytes_total counter
gatewayd_serial_bytes_total{direction="in",link="a"} 42.0
gatewayd_serial_bytes_total{direction="out",link="a"} 7.0
# HELP gatewayd_sync_last_success_timestamp_seconds When a sink last delivered a batch
# TYPE gatewayd_sync_last_success_timestamp_seconds gauge
gatewayd_sync_last_success_timestamp_seconds{sink="cloud"} 1.7000000005e+09
# HELP gatewayd_test_level A level
# TYPE gatewayd_test_level gauge
gatewayd_test_level -2.5
"""


def test_label_values_and_help_are_escaped_and_odd_values_render():
    m = Metrics()
    m.collector("gatewayd_odd", "gauge", 'help with \\ and\na newline', lambda: [
        Sample("gatewayd_odd", {"v": 'quote " backslash \\ newline \n'}, math.nan),
        Sample("gatewayd_odd", {"v": "inf"}, math.inf),
    ])
    m.counter("gatewayd_events_rejected_total", "", ("family",)).inc(family="x\ny")
    text = m.render()
    assert '# HELP gatewayd_odd help with \\\\ and\\na newline\n' in text
    assert 'gatewayd_odd{v="quote \\" backslash \\\\ newline \\n"} NaN\n' in text
    assert 'gatewayd_odd{v="inf"} +Inf\n' in text
    assert 'gatewayd_events_rejected_total{family="x\\ny"} 1.0\n' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["gatewayd_events_rejected"].samples[0].labels == {"family": "x\ny"}


def test_the_page_parses_back_to_the_same_values():
    families = {f.name: f for f in text_string_to_metric_families(sample_registry().render())}
    # The parser names counter families without "_total", as prometheus_client does.
    auth = families["gatewayd_auth_failures"]
    assert auth.type == "counter"
    assert {(s.labels["scheme"], s.value) for s in auth.samples if s.labels["family"] == "meter"} == {
        ("api_key", 2.0), ("jwt", 1.0)}
    assert families["gatewayd_test_level"].samples[0].value == -2.5


def test_each_gateway_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.counter("gatewayd_things_total", "Things").inc(3)
    b.counter("gatewayd_things_total", "Things").inc()
    assert a.counter("gatewayd_things_total", "").value() == 3
    assert b.counter("gatewayd_things_total", "").value() == 1
    assert prometheus_client.REGISTRY.get_sample_value("gatewayd_things_total") is None


def test_get_or_create_and_conflicts():
    m = Metrics()
    c = m.counter("gatewayd_x_total", "X", ("a",))
    assert m.counter("gatewayd_x_total", "another help is ignored", ("a",)) is c
    # Prometheus' counter naming: a name without _total is exposed (and found) with it.
    assert m.counter("gatewayd_x", "X", ("a",)) is c
    with pytest.raises(ValueError, match="another type or labels"):
        m.counter("gatewayd_x_total", "X", ("b",))
    with pytest.raises(ValueError, match="another type or labels"):
        m.gauge("gatewayd_x_total", "X", ("a",))
    with pytest.raises(ValueError):  # a live family may not take an owned family's name
        m.collector("gatewayd_x_total", "counter", "X", lambda: [])
    m.collector("gatewayd_live", "gauge", "L", lambda: [])
    with pytest.raises(ValueError):
        m.collector("gatewayd_live", "gauge", "L again", lambda: [])
    with pytest.raises(ValueError, match="ends in _total"):
        m.collector("gatewayd_live_count", "counter", "L", lambda: [])
    with pytest.raises(ValueError, match="kind"):
        m.collector("gatewayd_live_h", "histogram", "L", lambda: [])
    for bad in ("9lives", "gatewayd-dash", "gatewayd_ünïcode"):
        with pytest.raises(ValueError, match="invalid metric name"):
            m.gauge(bad, "")


def test_labels_must_match_and_counters_only_go_up():
    m = Metrics()
    c = m.counter("gatewayd_y_total", "Y", ("a", "b"))
    for labels in ({}, {"a": "1"}, {"a": "1", "b": "2", "c": "3"}):
        with pytest.raises(ValueError, match="expected labels"):
            c.inc(**labels)
        with pytest.raises(ValueError, match="expected labels"):
            c.value(**labels)
    with pytest.raises(ValueError, match="expected labels"):
        m.counter("gatewayd_z_total", "Z").inc(a="1")
    with pytest.raises(ValueError):
        c.inc(-1, a="1", b="2")
    g = m.gauge("gatewayd_g", "G", ("class",))
    g.inc(-2, **{"class": "history"})
    g.inc(5, **{"class": "history"})
    assert g.value(**{"class": "history"}) == 3


def test_a_label_set_is_one_series_however_it_is_passed():
    m = Metrics()
    c = m.counter("gatewayd_v_total", "V", ("kind", "outcome"))
    c.inc(kind="telemetry", outcome="stored")
    c.inc(outcome="stored", kind="telemetry")
    c.inc(kind="telemetry", outcome=["stored"])  # str()-ed, as before: a distinct series
    c.inc(kind="telemetry", outcome=["stored"])
    assert c.value(kind="telemetry", outcome="stored") == 2
    assert c.value(kind="telemetry", outcome="['stored']") == 2
    assert m.render().count("gatewayd_v_total{") == 2


def test_value_does_not_create_a_series():
    m = Metrics()
    c = m.counter("gatewayd_w_total", "W", ("a",))
    assert c.value(a="never") == 0
    assert "gatewayd_w_total{" not in m.render()
    c.inc(a=7)  # label values are strings on the page, whatever was passed
    assert c.value(a="7") == 1 and 'gatewayd_w_total{a="7"} 1.0' in m.render()


async def test_a_running_gateways_page_parses_and_has_no_duplicates(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("everything", plugin_everything)]) as gw:
            async with gw_client(gw) as client:
                await client.post("/everything/readings", json={"value": 1})
                text = (await client.get("/metrics")).text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(names) == len(set(names)) > 20
    assert names == sorted(names)
    assert "_created" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["gatewayd_everything_readings"].samples[0].value == 1
    assert {s.labels["plugin"]: s.value for s in families["gatewayd_plugin_up"].samples} == {"everything": 1}


@pytest.mark.parametrize("reach_in", [True, False])
def test_a_counter_bumped_again_counts_as_prometheus_client_counts(monkeypatch, reach_in):
    from gatewayd.core import metrics
    assert metrics._REACH_IN  # the pinned prometheus_client (constraints.txt)
    monkeypatch.setattr(metrics, "_REACH_IN", reach_in)
    m = Metrics()
    c = m.counter("gatewayd_r_total", "R", ("via",))
    for _ in range(3):
        c.inc(via="http")
    c.inc(2.5, via="http")
    c.inc(via="mqtt")
    with pytest.raises(ValueError, match="non-negative"):
        c.inc(-1, via="http")  # refused after the first bump as before it
    with pytest.raises(ValueError, match="expected labels"):
        c.inc(other="x")
    assert c.value(via="http") == 5.5 and c.value(via="mqtt") == 1
    assert 'gatewayd_r_total{via="http"} 5.5\ngatewayd_r_total{via="mqtt"} 1.0' in m.render()
    assert len(c._values) == (2 if reach_in else 0)
