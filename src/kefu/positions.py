"""Queue positions and estimated waits, pushed to waiting customers when they change.

A group's queue moves when a conversation is assigned, requeued, closed or joins it; every
customer behind the change has a new position. Changes are coalesced per group over
``queue_update_interval`` and each customer is pushed only what differs from their last
push. The estimated wait is the position times the group's recent interval between
assignments (a moving average), rounded to :data:`ESTIMATE_STEP` seconds.

In a cluster the ring owner of ``("queue", group)`` pushes the group's positions and keeps
its pace: a node that changes a queue it does not own announces the change (and the time
of an assignment) on the cluster's announcement channel, and only the owner acts on it. So
every customer gets one push per change, with an estimate from the whole cluster's pace.
A new owner (the ring moved) starts with no pace and pushes each position once more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable

from kefu.broker import Broker
from kefu.config import ServiceSettings
from kefu.metrics import Metrics
from kefu.model import AgentStatus
from kefu.protocol import frames as f
from kefu.protocol.server import encode
from kefu.routing import RoutingBackend
from kefu.tasks import stop_if_cancelled

log = logging.getLogger(__name__)

#: Pushes between two yields to the event loop (a long queue must not stall everyone else
#: while its positions go out).
POSITIONS_PER_SLICE = 256
#: Estimated waits are pushed rounded to this many seconds (finer is noise).
ESTIMATE_STEP = 5.0
#: The announcement topic of a queue change made off the group's owner.
QUEUE_TOPIC = "queue"
#: Weight of the newest interval in a group's moving average of assignment intervals.
EWMA_WEIGHT = 0.2


@dataclasses.dataclass(slots=True)
class GroupPace:
    """How fast a group's queue moves."""

    last_assignment: int = 0
    interval_ms: float | None = None

    def assigned(self, now: int) -> None:
        if self.last_assignment:
            gap = float(now - self.last_assignment)
            self.interval_ms = (
                gap
                if self.interval_ms is None
                else (1 - EWMA_WEIGHT) * self.interval_ms + EWMA_WEIGHT * gap
            )
        self.last_assignment = now


class QueuePositions:
    def __init__(
        self,
        settings: ServiceSettings,
        *,
        routing: RoutingBackend,
        broker: Broker,
        metrics: Metrics,
        owns: Callable[[str, str], bool] = lambda kind, key: True,
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.broker = broker
        self.metrics = metrics
        #: Whether this node pushes the positions of a group: ``owns("queue", group)``.
        self.owns = owns
        #: group -> time of an assignment made here, for its owner (sent with the change)
        self._assigned_at: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._closing = False
        #: conv -> (group, position, backlog, estimate) last pushed
        self._pushed: dict[str, tuple[str, int, bool, float | None]] = {}
        self._pace: dict[str, GroupPace] = {}
        #: Groups whose positions this node pushed (and remembers in ``_pushed``).
        self._pushed_groups: set[str] = set()

    def changed(self, *groups: str) -> None:
        """These groups' queues changed: push what moved, soon (here, or on the node that
        owns the group)."""
        for group in groups:
            if self.owns("queue", group):
                self._dirty.add(group)
                self._wake.set()
            else:
                assigned = self._assigned_at.pop(group, None)
                self.broker.announce(QUEUE_TOPIC, json.dumps([group, assigned]))
                if group in self._pushed_groups:  # should it come back here, push afresh
                    self._pushed_groups.discard(group)
                    self._forget(group)

    def assigned(self, group: str, now: int) -> None:
        """A conversation of the group was assigned at ``now`` (ms): the pace moves. (Off
        the group's owner, this travels with the :meth:`changed` that follows.)"""
        if self.owns("queue", group):
            self._pace.setdefault(group, GroupPace()).assigned(now)
        else:
            self._assigned_at[group] = now

    def announced(self, data: str) -> None:
        """Another node changed a group's queue (``data``: JSON [group, assigned ms])."""
        try:
            group, assigned = json.loads(data)
        except ValueError:  # pragma: no cover - only Kefu nodes announce
            return
        if not isinstance(group, str) or not self.owns("queue", group):
            return
        if isinstance(assigned, int):
            self._pace.setdefault(group, GroupPace()).assigned(assigned)
        self.changed(group)

    def _forget(self, group: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Forget what was pushed for the group's conversations (but those in ``keep``)."""
        gone = [c for c, key in self._pushed.items() if key[0] == group and c not in keep]
        for conv in gone:
            del self._pushed[conv]

    def stop(self) -> None:
        """End :meth:`run` (even where a library swallowed its task's cancellation)."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            await asyncio.sleep(self.settings.queue_update_interval)  # coalesce a burst
            groups, self._dirty = self._dirty, set()
            for group in sorted(groups):
                try:
                    await self.push(group)
                except Exception:
                    stop_if_cancelled()
                    log.exception("queue positions of %s failed", group)

    async def push(self, group: str) -> int:
        """Push each waiting customer of the group their position, if it changed."""
        entries = await self.routing.queue(group)
        pace = self._pace.get(group)
        online = sum(
            1
            for a in await self.routing.agents()
            if group in a.groups and a.effective is AgentStatus.ONLINE
        )
        pushed = 0
        live = 0
        for entry in entries:
            if not entry.backlog:
                live += 1
            position = 0 if entry.backlog else live
            estimate = None
            if pace is not None and pace.interval_ms is not None and online and not entry.backlog:
                seconds = position * pace.interval_ms / 1000
                estimate = max(ESTIMATE_STEP, round(seconds / ESTIMATE_STEP) * ESTIMATE_STEP)
            key = (group, position, entry.backlog, estimate)
            if self._pushed.get(entry.conv) == key:
                continue
            self._pushed[entry.conv] = key
            if pushed and pushed % POSITIONS_PER_SLICE == 0:
                await asyncio.sleep(0)
            self.broker.deliver(
                [entry.customer],
                encode(
                    f.QueuePosition(
                        conv=entry.conv,
                        group=group,
                        position=position,
                        estimated_wait=estimate,
                        backlog=entry.backlog,
                    )
                ),
                ephemeral=True,
            )
            pushed += 1
        queued = {e.conv for e in entries}
        self.metrics.queue_length.labels(group=group).set(live)
        self._forget(group, keep=queued)
        self._pushed_groups.add(group)
        self.metrics.queue_position_pushes.inc(pushed)
        return pushed
