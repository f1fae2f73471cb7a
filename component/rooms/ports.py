"""What the room core needs kept: the SIP users' seats, so rooms are rejoined after a restart.

The core never calls the store itself; it returns ``SaveMembership`` and ``DeleteMembership``
effects, and is handed ``list_memberships()`` through ``RoomsCore.restore`` at start. The store
implements this Protocol (DESIGN 6, 8); tests use an in-memory fake.
"""

from __future__ import annotations

from typing import Protocol

from component.rooms.model import Membership
from component.store import MembershipState, RoomMembership, StorePort


class RoomStore(Protocol):
    """Durable seats of SIP users in rooms, one per SIP user and room."""

    async def save_membership(self, membership: Membership) -> None:
        """Insert or replace the seat of ``membership.aor`` in ``membership.room``."""
        ...

    async def delete_membership(self, aor: str, room: str) -> bool:
        """Forget a seat; False if there was none."""
        ...

    async def list_memberships(self) -> list[Membership]:
        """Every stored seat, to rejoin after a restart."""
        ...


class StoredMemberships:
    """``RoomStore`` on the store port's membership records, room passwords included (a
    password room is rejoined after a restart with the password the user joined with)."""

    def __init__(self, store: StorePort) -> None:
        self.store = store

    async def save_membership(self, membership: Membership) -> None:
        """Insert or replace the seat (nick and password included)."""
        record = RoomMembership(
            membership.aor,
            membership.room,
            membership.nick,
            MembershipState.JOINED,
            membership.password,
        )
        await self.store.save_membership(record)

    async def delete_membership(self, aor: str, room: str) -> bool:
        """Forget a seat; False if there was none."""
        return await self.store.remove_membership(aor, room)

    async def list_memberships(self) -> list[Membership]:
        """Every stored seat."""
        return [
            Membership(m.sip_aor, m.room_jid, m.nick, m.password)
            for m in await self.store.memberships()
        ]
