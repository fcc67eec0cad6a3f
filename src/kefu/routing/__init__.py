"""Routing state: queues, agent presence and load, and atomic assignment.

:class:`RoutingBackend` is the interface; :class:`MemoryRouting` keeps the state in this
process (embedded mode). The cluster implementation keeps it in Redis with one Lua script
per atomic step, so every method is a coroutine and states its atomicity.
"""

from kefu.routing.base import AgentState, Assignment, QueueEntry, RoutingBackend, RoutingError
from kefu.routing.memory import MemoryRouting

__all__ = [
    "AgentState",
    "Assignment",
    "MemoryRouting",
    "QueueEntry",
    "RoutingBackend",
    "RoutingError",
]
