"""Prometheus metrics of one node. The registry is passed in, never a global.

Counters and histograms are :mod:`kefu.instruments` types, updated from the node's event
loop only; the garbage collector's pauses, observed from whichever thread collects, and
the gauges are prometheus_client's own.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge

from kefu.instruments import Counter, Histogram

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    """Every counter, gauge and histogram a node exports on /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "websocket_connections_total",
            "Open WebSocket connections on this node (a gauge, named as in the source system).",
            registry=r,
        )
        self.connections_opened = Counter(
            "kefu_connections_opened",
            "WebSocket connections accepted (before authentication).",
            registry=r,
        )
        self.connections_closed = Counter(
            "kefu_connections_closed",
            "WebSocket connections closed, by close code.",
            ["code"],
            registry=r,
        )
        self.refused = Counter(
            "kefu_connections_refused",
            "Connections refused at the upgrade or at authentication, by reason.",
            ["reason"],
            registry=r,
        )
        self.messages = Counter(
            "kefu_messages",
            "Chat messages received from clients, by message type and result.",
            ["type", "result"],
            registry=r,
        )
        self.frames_in = Counter(
            "kefu_frames_received",
            "Client frames received, by op.",
            ["op"],
            registry=r,
        )
        self.pushes = Counter(
            "kefu_pushes",
            "Frames pushed to connections, by kind.",
            ["kind"],
            registry=r,
        )
        self.dropped = Counter(
            "kefu_ephemeral_dropped",
            "Ephemeral frames (typing) dropped for slow consumers.",
            registry=r,
        )
        self.latency = Histogram(
            "websocket_message_latency_seconds",
            "From a message's receipt to its push written to a recipient's connection.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_latency = Histogram(
            "kefu_ack_latency_seconds",
            "From a message's receipt to its ack written (includes the durable commit).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "kefu_errors",
            "Error frames sent to clients, by error code.",
            ["code"],
            registry=r,
        )
        self.store_batch_size = Histogram(
            "kefu_store_batch_size",
            "Jobs per group-committed store transaction.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.store_commit_seconds = Histogram(
            "kefu_store_commit_seconds",
            "Duration of a store batch from BEGIN to COMMIT done.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "kefu_store_errors",
            "Store operations that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.store_requeued = Counter(
            "kefu_store_requeued",
            "Writes run again in the next batch because another node's transaction held "
            "their conversation.",
            registry=r,
        )
        self.store_overloaded = Counter(
            "kefu_store_overloaded",
            "Writes refused with 'overloaded' because too many were queued.",
            registry=r,
        )
        self.send_queue_overflow = Counter(
            "kefu_send_queue_overflow",
            "Connections closed because their send queue was full (slow consumers).",
            registry=r,
        )
        self.heartbeat_timeouts = Counter(
            "kefu_heartbeat_timeouts",
            "Connections closed after missing heartbeats.",
            registry=r,
        )
        self.rate_limited = Counter(
            "kefu_rate_limited",
            "Frames refused by the per-connection rate limit.",
            registry=r,
        )
        self.gc_pauses = prometheus_client.Histogram(
            "kefu_gc_pause_seconds",
            "Garbage-collector pauses of the node process, by generation.",
            ["generation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "kefu_event_loop_lag_seconds",
            "How late a timer due every 0.1 s ran on the node's event loop (seconds): "
            "time a ready callback waited behind others, a blocking call or the CPU.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.draining = Gauge(
            "kefu_draining",
            "1 while the node is shutting down and refusing new work.",
            registry=r,
        )
        # -- customer service ----------------------------------------------------------------
        self.transitions = Counter(
            "kefu_conversation_transitions",
            "Conversation lifecycle transitions, by event.",
            ["event"],
            registry=r,
        )
        self.assignments = Counter(
            "kefu_assignments",
            "Conversations assigned to an agent, by how (auto, pick, transfer, reopen, takeover).",
            ["how"],
            registry=r,
        )
        self.assignment_failures = Counter(
            "kefu_assignment_failures",
            "Assignments undone because the store refused them, by reason.",
            ["reason"],
            registry=r,
        )
        self.queue_length = Gauge(
            "kefu_queue_length",
            "Conversations waiting in a group's queue (live queue, not left messages).",
            ["group"],
            registry=r,
        )
        self.queue_position_pushes = Counter(
            "kefu_queue_position_pushes",
            "Queue-position updates pushed to waiting customers.",
            registry=r,
        )
        self.agents_online = Gauge(
            "kefu_agents_online",
            "Agents whose status is online.",
            registry=r,
        )
        self.timer_actions = Counter(
            "kefu_timer_actions",
            "Actions taken by the desk's timers and routing, by kind (accept_timeout, "
            "agent_offline, overflow, inactivity_warning, inactivity_close).",
            ["kind"],
            registry=r,
        )
        self.queue_refused = Counter(
            "kefu_queue_refused",
            "Customers refused with 'overloaded' because their group's queue was full "
            "(max_queued).",
            ["group"],
            registry=r,
        )
        # -- webhooks ------------------------------------------------------------------------
        self.webhook_deliveries = Counter(
            "kefu_webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, retried, failed, dropped).",
            ["result"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "kefu_webhook_delivery_seconds",
            "Duration of one webhook POST, whatever its result.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.webhook_queue = Gauge(
            "kefu_webhook_queue",
            "Webhook events waiting for delivery (all receivers).",
            registry=r,
        )
        # -- cluster ---------------------------------------------------------------------------
        self.cluster_nodes = Gauge(
            "kefu_cluster_nodes", "Live nodes in the ring as this node sees it.", registry=r
        )
        self.ring_changes = Counter(
            "kefu_ring_changes",
            "Times this node's ring changed (a node joined, left or changed weight).",
            registry=r,
        )
        self.cluster_publishes = Counter(
            "kefu_cluster_publishes",
            "Publishes to other nodes' inbox channels (one carries every push for that node "
            "from one batch).",
            registry=r,
        )
        self.cluster_commands = Counter(
            "kefu_cluster_redis_commands",
            "Redis commands sent by the cross-node delivery path, by kind.",
            ["kind"],
            registry=r,
        )
        self.cluster_deliveries = Counter(
            "kefu_cluster_deliveries",
            "Pushes by path: local (this node's connections), remote (handed to another "
            "node), received (from another node), inbox (stored for an offline user).",
            ["path"],
            registry=r,
        )
        self.cluster_errors = Counter(
            "kefu_cluster_errors",
            "Redis operations that failed, by operation (clients recover by sync).",
            ["operation"],
            registry=r,
        )
        self.cluster_redis_up = Gauge(
            "kefu_cluster_redis_up",
            "1 while this node's delivery subscription to Redis is established.",
            registry=r,
        )
        self.stale_sends = Counter(
            "kefu_stale_sends",
            "Messages authorised against a conversation state another node had changed: "
            "decided again on a fresh read.",
            registry=r,
        )
        self.reloads = Counter(
            "kefu_config_reloads",
            "Times the node took new settings at runtime (SIGHUP or a cluster-wide change).",
            registry=r,
        )
        # Label children used on every message (labels(...) by position is one lookup).
        self.message_result = self.messages.labels  # (type, result)
        self.frame_op = self.frames_in.labels  # (op,)
        self.push_kind = self.pushes.labels  # (kind,)
        self.error_code = self.errors.labels  # (code,)
