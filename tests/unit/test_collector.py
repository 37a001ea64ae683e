"""The collector on a fake map reader: names, labels, values, failures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.utils import floatToGoString
from prometheus_client import CollectorRegistry, generate_latest

from tracer import metrics as m
from tracer.collector import TcpstateCollector
from tracer.reasons import possible_reasons
from tracer.states import FAMILIES, GAUGE_STATES, KNOWN_TRANSITIONS, STATES, name_of

from .fake_reader import FakeReader

GOLDEN = Path(__file__).parent / "golden" / "metrics.prom"


def registry_for(reader: FakeReader) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TcpstateCollector(reader, bcc_version="0.26.0", kernel="6.18.0-test",
                                        attach="raw_tracepoint"))
    return registry


def example_reader() -> FakeReader:
    reader = FakeReader(ports=(80, 5432), time_wait=7)
    reader.transition("ipv4", "close", "syn_sent", 10, port="80")
    reader.transition("ipv4", "syn_sent", "established", 9, port="80")
    reader.transition("ipv4", "syn_sent", "close", 1, port="80")
    reader.transition("ipv6", "established", "close", 3, port="other")
    reader.transition("ipv4", "close", "close", 2, port="5432")  # outside the known set
    reader.close("ipv4", "syn_sent", "refused", 1, port="80")
    reader.close("ipv6", "established", "reset_by_peer", 2, port="other")
    reader.close("ipv6", "established", "reset_local", 1, port="other")
    reader.close("ipv4", "close", "other", 2, port="5432")  # outside the possible set
    reader.duration("ipv4", "syn_sent", "established", slot=5, count=9, sum_ns=9 * 30_000,
                    port="80")
    reader.duration("ipv6", "established", "close", slot=33, count=3, sum_ns=3 * 10**13,
                    port="other")
    reader.lifetime("ipv4", "client", slot=12, count=9, sum_ns=9 * 4_000_000, port="80")
    reader.live("ipv4", "established", 4, port="80")
    reader.live("ipv4", "listen", 1, port="5432")
    reader.age("ipv4", "established", slot=20, count=3, sum_ns=3 * 600e6, port="80")
    reader.age("ipv4", "established", slot=30, count=1, sum_ns=700e9, port="80")
    reader.age_unknown("ipv4", "listen", 1, port="5432")
    reader.snapshot.counters.update(evictions=2, duration_unknown=6, other_protocol=1)
    reader.snapshot.table_entries = 7
    reader.snapshot.missed_events = 0
    return reader


def test_closes_possible_pairs_at_zero_and_seen_ones():
    registry = registry_for(example_reader())
    value = registry.get_sample_value
    name = m.CLOSES
    for old, reason in possible_reasons():
        for family in FAMILIES:
            labels = dict(family=family, old_state=name_of(old), reason=reason, port="5432")
            assert value(name, labels) == 0
    assert value(name, dict(family="ipv4", old_state="syn_sent", reason="refused",
                            port="80")) == 1
    assert value(name, dict(family="ipv6", old_state="established", reason="reset_by_peer",
                            port="other")) == 2
    assert value(name, dict(family="ipv4", old_state="close", reason="other",
                            port="5432")) == 2
    assert value(name, dict(family="ipv4", old_state="listen", reason="refused",
                            port="80")) is None  # a pair the table never gives


def test_closes_absent_when_reasons_are_off():
    reader = example_reader()
    reader.snapshot.closes = None
    text = generate_latest(registry_for(reader)).decode()
    assert m.CLOSES not in text
    assert m.TRANSITIONS in text


def test_transitions_known_set_at_zero_and_seen_ones():
    registry = registry_for(example_reader())
    value = registry.get_sample_value
    for old, new in KNOWN_TRANSITIONS:
        for family in FAMILIES:
            for port in ("other", "80", "5432"):
                assert value(m.TRANSITIONS, {"family": family, "old_state": old,
                                             "new_state": new, "port": port}) is not None
    assert value(m.TRANSITIONS, {"family": "ipv4", "old_state": "syn_sent",
                                 "new_state": "established", "port": "80"}) == 9
    # a transition outside the known set still appears once seen
    assert value(m.TRANSITIONS, {"family": "ipv4", "old_state": "close",
                                 "new_state": "close", "port": "5432"}) == 2


def test_histogram_buckets_are_cumulative_and_exact():
    registry = registry_for(example_reader())
    labels = {"family": "ipv4", "old_state": "syn_sent", "new_state": "established", "port": "80"}
    value = registry.get_sample_value
    name = m.STATE_DURATION
    bound = m.BUCKET_BOUNDS_SECONDS
    assert value(f"{name}_bucket", {**labels, "le": str(bound[4])}) == 0
    assert value(f"{name}_bucket", {**labels, "le": str(bound[5])}) == 9
    assert value(f"{name}_bucket", {**labels, "le": "+Inf"}) == 9
    assert value(f"{name}_count", labels) == 9
    assert value(f"{name}_sum", labels) == pytest.approx(9 * 30e-6)
    # the top slot is +Inf: an hours-long duration is counted, not dropped
    long = {"family": "ipv6", "old_state": "established", "new_state": "close", "port": "other"}
    assert value(f"{name}_bucket", {**long, "le": str(bound[-2])}) == 0
    assert value(f"{name}_bucket", {**long, "le": "+Inf"}) == 3
    # only transitions with observations get a histogram
    assert value(f"{name}_count", {**labels, "port": "5432"}) is None


def test_sockets_gauge_and_time_wait():
    registry = registry_for(example_reader())
    value = registry.get_sample_value
    assert value(m.SOCKETS, {"family": "ipv4", "state": "established", "port": "80"}) == 4
    assert value(m.SOCKETS, {"family": "ipv6", "state": "closing", "port": "other"}) == 0
    assert value(m.SOCKETS, {"family": "", "state": "time_wait", "port": ""}) == 7
    for state in GAUGE_STATES:
        if state != "time_wait":
            assert value(m.SOCKETS, {"family": "ipv4", "state": state, "port": "80"}) is not None


def test_no_port_label_without_service_ports():
    reader = FakeReader(time_wait=1)
    reader.transition("ipv4", "close", "listen", 1)
    registry = registry_for(reader)
    assert registry.get_sample_value(m.TRANSITIONS, {
        "family": "ipv4", "old_state": "close", "new_state": "listen"}) == 1
    assert registry.get_sample_value(m.SOCKETS, {"family": "", "state": "time_wait"}) == 1


def test_self_metrics_and_state_table():
    registry = registry_for(example_reader())
    value = registry.get_sample_value
    assert value(m.SOCKET_TABLE_ENTRIES) == 7
    assert value(m.SOCKET_TABLE_CAPACITY) == 1024
    assert value(m.SOCKET_TABLE_EVICTIONS) == 2
    assert value(m.DURATION_UNKNOWN) == 6
    assert value(m.OTHER_PROTOCOL) == 1
    assert value(m.MISSED_EVENTS) == 0
    assert value(m.BUILD_INFO, {"version": __import__("tracer").__version__,
                                "bcc_version": "0.26.0", "kernel": "6.18.0-test",
                                    "attach": "raw_tracepoint"}) == 1
    for state in STATES:
        assert value(m.STATE_INFO, {
            "state": state.name, "kernel_code": str(state.kernel_code),
            "mib_code": "" if state.mib_code is None else str(state.mib_code),
            "rfc793_name": state.rfc793_name}) == 1
    assert value(m.SCRAPE_SUCCESS, {"collector": "bpf"}) == 1
    assert value(m.SCRAPE_SUCCESS, {"collector": "time_wait"}) == 1


@pytest.mark.parametrize("part", ["bpf", "time_wait"])
def test_a_failing_part_drops_its_data_and_reports_zero(part):
    reader = example_reader()
    reader.fail.add(part)
    registry = registry_for(reader)
    value = registry.get_sample_value
    assert value(m.SCRAPE_SUCCESS, {"collector": part}) == 0
    other = "time_wait" if part == "bpf" else "bpf"
    assert value(m.SCRAPE_SUCCESS, {"collector": other}) == 1
    tw = value(m.SOCKETS, {"family": "", "state": "time_wait", "port": ""})
    established = value(m.SOCKETS, {"family": "ipv4", "state": "established", "port": "80"})
    if part == "bpf":
        assert established is None and value(m.SOCKET_TABLE_EVICTIONS) is None and tw == 7
    else:
        assert tw is None and established == 4


def test_time_wait_turned_off_is_neither_exported_nor_failing():
    """A reader without a TIME-WAIT count: no gauge, and no failing part
    for an alert to fire on forever."""
    reader = example_reader()
    reader.time_wait = None
    value = registry_for(reader).get_sample_value
    assert value(m.SCRAPE_SUCCESS, {"collector": "time_wait"}) is None
    assert value(m.SCRAPE_SUCCESS, {"collector": "bpf"}) == 1
    assert value(m.SOCKETS, {"family": "", "state": "time_wait", "port": ""}) is None
    assert value(m.SOCKETS, {"family": "ipv4", "state": "established", "port": "80"}) == 4


def test_ages_in_state_are_a_cumulative_gauge_histogram_with_unknowns_apart():
    value = registry_for(example_reader()).get_sample_value
    labels = {"family": "ipv4", "state": "established", "port": "80"}
    bucket = m.SOCKET_STATE_AGE + "_bucket"
    assert value(bucket, {**labels, "le": floatToGoString(m.BUCKET_BOUNDS_SECONDS[19])}) == 0
    assert value(bucket, {**labels, "le": floatToGoString(m.BUCKET_BOUNDS_SECONDS[20])}) == 3
    assert value(bucket, {**labels, "le": floatToGoString(m.CLOSE_WAIT_STUCK_SECONDS)}) == 3
    assert value(bucket, {**labels, "le": "+Inf"}) == 4
    assert value(m.SOCKET_STATE_AGE + "_gcount", labels) == 4
    assert value(m.SOCKET_STATE_AGE + "_gsum", labels) == pytest.approx(701.8)
    # a state with no socket of known age has no histogram, but its unknowns
    listen = {"family": "ipv4", "state": "listen", "port": "5432"}
    assert value(m.SOCKET_STATE_AGE + "_gcount", listen) is None
    assert value(m.SOCKET_STATE_AGE_UNKNOWN, listen) == 1
    assert value(m.SOCKET_STATE_AGE_UNKNOWN, labels) == 0
    for state in ("time_wait", "close", "new_syn_recv"):
        assert value(m.SOCKET_STATE_AGE_UNKNOWN, {**labels, "state": state}) is None


def test_registering_does_not_read_the_maps():
    reader = example_reader()
    reader.fail.update({"bpf", "time_wait"})
    registry = CollectorRegistry(auto_describe=True)
    registry.register(TcpstateCollector(reader))  # would raise if it read


def test_golden_exposition():
    """The exposition of a known state, byte for byte; UPDATE_GOLDEN=1 rewrites it."""
    text = generate_latest(registry_for(example_reader())).decode()
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith(m.SCRAPE_DURATION)) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_golden_exposition_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool (Debian prometheus) is missing under CI")
        pytest.skip("promtool not installed (make setup-test installs it)")
    result = subprocess.run([promtool, "check", "metrics"], input=GOLDEN.read_bytes(),
                            capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""
