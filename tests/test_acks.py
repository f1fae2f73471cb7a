"""The acknowledgement barrier (component/xmpp/acks.py), sans-IO, driven by a fake clock."""

from __future__ import annotations

import itertools

import pytest

from component.xmpp.acks import AckBarrier, PingOverdue, SendPing, Unconfirmed


def _barrier(
    batch_size: int = 3, batch_delay: float = 0.05, ping_timeout: float = 15.0
) -> AckBarrier[str]:
    return AckBarrier(
        id_prefix="ack-",
        batch_size=batch_size,
        batch_delay=batch_delay,
        ping_timeout=ping_timeout,
    )


def test_one_ping_per_batch_after_the_delay_confirms_what_was_written_before_it() -> None:
    acks = _barrier()
    assert acks.written("m1", 10.0) == []
    assert acks.written("m2", 10.01) == []
    assert acks.next_deadline() == pytest.approx(10.05)  # first unpinged write + batch_delay
    assert acks.handle_timer(10.04) == []  # early: nothing yet
    assert acks.handle_timer(10.05) == [SendPing("ack-1")]
    assert acks.written("m3", 10.06) == []  # after the ping: not covered by it
    assert acks.answered("ack-1", 10.07) == 2
    assert acks.unconfirmed == 1 and acks.confirmed == 2
    assert acks.lost() == [Unconfirmed("m3", 10.06)]


def test_at_a_steady_rate_the_ping_goes_with_the_write_before_the_deadline() -> None:
    # 200 writes/s: the batch's deadline would pass before the next write, so the write just
    # before it carries the ping and the timer has nothing to do.
    acks = _barrier(batch_size=1000, batch_delay=0.05)
    pings: list[tuple[int, float]] = []
    for i in range(400):
        now = 100.0 + i * 0.005
        for effect in acks.written(f"m{i}", now):
            assert isinstance(effect, SendPing)
            pings.append((i, now))
        assert acks.handle_timer(now) == []  # never due: the writes keep ahead of it
    assert len(pings) >= 40  # about one per 50 ms ...
    assert all(b - a >= 2 for (a, _), (b, _) in itertools.pairwise(pings))  # ... each for 2 or more
    assert acks.pings_sent == len(pings)


def test_a_lone_write_or_a_passed_deadline_is_left_to_the_timer() -> None:
    acks = _barrier(batch_delay=0.05)
    assert acks.written("a", 0.0) == []  # the first write of a batch never pings early
    # The timer was late (the loop was busy): the write does not ping, the timer due in this
    # same pass does.
    assert acks.written("b", 0.06) == []
    assert acks.handle_timer(0.06) == [SendPing("ack-1")]
    # Writes a second apart: each batch's deadline passes between writes; the timer pings.
    assert acks.written("c", 1.0) == [] and acks.written("d", 2.0) == []
    assert acks.handle_timer(2.0) == [SendPing("ack-2")]


def test_a_full_batch_pings_at_once() -> None:
    acks = _barrier(batch_delay=10.0)
    assert acks.written("a", 0.0) == []
    assert acks.written("b", 0.0) == []
    assert acks.written("c", 0.0) == [SendPing("ack-1")]
    assert acks.written("d", 0.0) == []
    assert acks.pings_sent == 1 and acks.unconfirmed == 4


def test_an_answer_stands_for_every_earlier_ping() -> None:
    acks = _barrier(batch_size=1)
    pings = [acks.written(m, 1.0)[0] for m in ("a", "b", "c")]
    assert pings == [SendPing("ack-1"), SendPing("ack-2"), SendPing("ack-3")]
    # The stream is processed in order: an answer to ping 2 proves a and b.
    assert acks.answered("ack-2", 1.1) == 2
    assert acks.answered("ack-1", 1.2) == 0  # already stood for
    assert acks.answered("ack-3", 1.3) == 1
    assert acks.unconfirmed == 0 and acks.next_deadline() is None


def test_unknown_or_foreign_answers_confirm_nothing() -> None:
    acks = _barrier()
    acks.written("a", 0.0)
    acks.handle_timer(1.0)
    assert acks.answered("ack-99", 1.1) == 0
    assert acks.answered("other-1", 1.1) == 0
    assert acks.unconfirmed == 1
    assert acks.is_ping("ack-1") and not acks.is_ping("sx1234-1")


def test_lost_gives_back_everything_unconfirmed_in_write_order_and_starts_afresh() -> None:
    acks = _barrier()
    for i, m in enumerate(["a", "b", "c", "d"]):
        acks.written(m, float(i))
    assert acks.answered("ack-1", 5.0) == 3  # the batch of three pinged at once
    acks.written("e", 6.0)
    acks.handle_timer(7.0)  # ping 2 for d and e, never answered
    assert [u.item for u in acks.lost()] == ["d", "e"]
    assert acks.unconfirmed == 0 and acks.next_deadline() is None
    assert acks.answered("ack-2", 8.0) == 0  # an answer from the dead stream means nothing
    assert acks.lost() == []


def test_an_unanswered_ping_is_reported_overdue() -> None:
    acks = _barrier(ping_timeout=15.0)
    acks.written("a", 100.0)
    assert acks.handle_timer(100.05) == [SendPing("ack-1")]
    assert acks.next_deadline() == pytest.approx(115.05)
    assert acks.handle_timer(115.0) == []
    assert acks.handle_timer(115.05) == [PingOverdue("ack-1", 100.05)]


def test_nothing_written_nothing_pinged() -> None:
    acks = _barrier()
    assert acks.next_deadline() is None
    assert acks.handle_timer(1e9) == [] and acks.ping_now(1e9) == []
    acks.written("a", 1.0)
    assert acks.ping_now(1.0) == [SendPing("ack-1")]
    assert acks.ping_now(1.0) == []  # nothing new since


@pytest.mark.parametrize(
    ("size", "delay", "timeout"), [(0, 0.05, 15.0), (3, -1.0, 15.0), (3, 0.05, 0.0)]
)
def test_bad_settings_are_refused(size: int, delay: float, timeout: float) -> None:
    with pytest.raises(ValueError):
        _barrier(size, delay, timeout)
