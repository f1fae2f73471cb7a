"""Periodic sweeps (DESIGN 8, 10 ``sleep_time``): the message queue retried and expired; typing
that nobody refreshed ended, and stored message identities past their ``keep`` deleted
(DESIGN 4.3)."""

from __future__ import annotations

import asyncio

from component.logs import get_logger
from component.messaging.notifications import Notifications
from component.messaging.router import MessageRouter
from component.ports import Clock
from component.store import StorePort, StoreUnavailable

log = get_logger("component.runtime.sweeps")


async def sweep_queue(
    router: MessageRouter, store: StorePort, *, interval: float, clock: Clock
) -> None:
    """Until cancelled: every ``interval`` seconds, retry what is due and expire what is late.

    First it releases the claims an earlier run of this instance left (a crash mid-attempt),
    so those messages are tried again rather than waiting for their claims to time out.
    """
    await store.release_claims(router.instance, clock())
    while True:
        try:
            await router.retry_due()
        except StoreUnavailable as exc:
            # The health state logs the outage once; the next sweep after it tries again.
            log.debug("queue_sweep_skipped", reason=str(exc))
        except Exception:
            log.exception("queue_sweep_failed")
        await asyncio.sleep(interval)


async def sweep_chat_states(notes: Notifications, *, interval: float = 1.0) -> None:
    """Until cancelled: every ``interval`` seconds, end the typing whose refresh ran out.

    A second is fine-grained enough: RFC 3994 refresh intervals are tens of seconds.
    """
    while True:
        try:
            await notes.expire()
        except Exception:
            log.exception("chat_state_sweep_failed")
        await asyncio.sleep(interval)


async def sweep_message_identities(notes: Notifications, *, interval: float) -> None:
    """Until cancelled: every ``interval`` seconds, delete the stored message identities no
    notification can come for any more. Every instance sweeps; a second DELETE finds none."""
    while True:
        try:
            removed = await notes.expire_stored()
            if removed:
                log.debug("message_identities_expired", count=removed)
        except StoreUnavailable as exc:
            log.debug("identity_sweep_skipped", reason=str(exc))
        except Exception:
            log.exception("identity_sweep_failed")
        await asyncio.sleep(interval)
