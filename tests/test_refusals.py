"""Refused clients as the log and `meshplane status` tell them: once per peer and reason per interval,
with the number not logged; a bounded memory of who was refused lately."""

from __future__ import annotations

import structlog

from meshplane.xds import refusals


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _refuse(table: refusals.Refusals, peer: str = "ipv4:10.1.2.3:40000", reason: str = "identity") -> None:
    table.record("xDS client refused", peer=peer, code="PERMISSION_DENIED", reason=reason, message="no", node="n1")


def test_a_retrying_peer_is_logged_once_per_interval_with_the_count_not_logged() -> None:
    clock = Clock()
    table = refusals.Refusals(interval=60, clock=clock)
    with structlog.testing.capture_logs() as logs:
        for second in range(130):  # a refusal every second, from new source ports, for 130 s
            clock.now += 1
            _refuse(table, peer=f"ipv4:10.1.2.3:{40000 + second}")
    assert [e.get("suppressed") for e in logs] == [None, 59, 59]
    assert all(e["log_level"] == "warning" and e["status"] == "PERMISSION_DENIED" for e in logs)
    (entry,) = table.recent()
    assert (entry.address, entry.reason, entry.count, entry.node) == ("10.1.2.3", "identity", 130, "n1")
    assert entry.last - entry.first == 129


def test_each_peer_and_reason_has_its_own_interval() -> None:
    clock = Clock()
    table = refusals.Refusals(interval=60, clock=clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            _refuse(table)
            _refuse(table, reason="names")
            _refuse(table, peer="ipv4:10.9.9.9:1")
    assert len(logs) == 3
    assert sorted((r.address, r.reason, r.count) for r in table.recent()) == [
        ("10.1.2.3", "identity", 3), ("10.1.2.3", "names", 3), ("10.9.9.9", "identity", 3)]


def test_what_is_kept_is_bounded_and_forgotten_after_the_window() -> None:
    clock = Clock()
    table = refusals.Refusals(window=600, keep=100, clock=clock)
    with structlog.testing.capture_logs():
        for n in range(250):  # a stranger from 250 addresses
            clock.now += 0.01
            _refuse(table, peer=f"ipv4:10.0.{n // 250}.{n % 250}:1")
    recent = table.recent()
    assert len(recent) == 100
    assert recent[0].address == "10.0.0.249" and recent[-1].address == "10.0.0.150"  # the quietest went first
    clock.now += 601
    assert table.recent() == []
