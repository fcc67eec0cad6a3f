"""Several nodes on one Redis (standalone and Redis Cluster) and one PostgreSQL: targeted
cross-node delivery, multi-device across nodes, the offline inbox, membership and purges.

The nodes run in this process (each its own Server on its own port); the failure tests
with real processes are in test_cluster_failures.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from kefu.cluster import redis_client as rc
from kefu.model import Agent
from tests.cluster_helpers import Connect, StartNodes, broker, eventually, sample, send
from tests.conftest import RawClient, open_conversation, token
from tests.services import RedisServer


async def test_cross_node_chat_reaches_only_the_nodes_that_hold_a_recipient(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, n1, n2 = await start_nodes(3)
    customer = await connect_to(n0, "cust-x", "customer")
    agent = await connect_to(n1, "agent-x", "agent")
    conv = await open_conversation(agent, "cust-x")
    assert (await customer.recv_op("conversation"))["conversation"]["conv"] == conv

    for n in range(1, 21):
        sender, receiver = (customer, agent) if n % 2 else (agent, customer)
        ack = await sender.request(send(conv, n))
        assert ack["op"] == "ack", ack
        push = await receiver.recv_op("message")
        assert (push["seq"], push["body"]["text"]) == (ack["seq"], f"message {n}")
    # n2 holds nobody of this conversation: it received nothing at all.
    assert sample(n2, "kefu_cluster_deliveries_total", path="received") == 0
    assert sample(n0, "kefu_cluster_deliveries_total", path="received") >= 10
    assert sample(n1, "kefu_cluster_deliveries_total", path="received") >= 10
    # One publish per message and target node (plus the conversation's own pushes).
    published = sum(sample(s, "kefu_cluster_publishes_total") for s in (n0, n1, n2))
    assert 20 <= published <= 30, published
    page = await customer.request({"op": "sync", "id": 99, "conv": conv, "after_seq": 0})
    assert [m["seq"] for m in page["messages"]] == list(range(1, 21))


async def test_every_device_of_a_user_gets_the_push_whatever_its_node(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, n1, n2 = await start_nodes(3)
    phone = await connect_to(n0, "cust-m", "customer")
    laptop = await connect_to(n2, "cust-m", "customer")
    agent = await connect_to(n1, "agent-m", "agent")
    conv = await open_conversation(agent, "cust-m")
    for device in (phone, laptop):
        assert (await device.recv_op("conversation"))["conversation"]["conv"] == conv
    ack = await agent.request(send(conv, 1, "to both"))
    for device in (phone, laptop):
        push = await device.recv_op("message")
        assert (push["seq"], push["body"]["text"]) == (ack["seq"], "to both")
    # A customer's own message reaches their other device on the other node too.
    mine = await phone.request(send(conv, 2, "from the phone"))
    echo = await laptop.recv_op("message")
    assert (echo["seq"], echo["sender"]) == (mine["seq"], "cust-m")


async def test_an_offline_user_finds_the_messages_in_the_inbox_on_connect(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, n1 = await start_nodes(2)
    customer = await connect_to(n0, "cust-o", "customer")
    agent = await connect_to(n1, "agent-o", "agent")
    conv = await open_conversation(agent, "cust-o")
    await customer.close()

    async def gone() -> bool:
        found = await broker(n1).presence.lookup(["cust-o"])
        return not found["cust-o"]

    await eventually(gone)
    acks = [await agent.request(send(conv, n, f"while away {n}")) for n in (1, 2, 3)]

    async def kept() -> bool:
        return int(await broker(n1).client.llen(rc.inbox("cust-o"))) == 3

    await eventually(kept)
    back = await connect_to(n1, "cust-o", "customer")
    pushed = [await back.recv_op("message") for _ in acks]
    assert [p["seq"] for p in pushed] == [a["seq"] for a in acks]
    assert await broker(n1).client.exists(rc.inbox("cust-o")) == 0  # drained


async def test_a_dead_nodes_presence_is_purged_and_the_ring_shrinks(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, n1, n2 = await start_nodes(3)
    customer = await connect_to(n2, "cust-d", "customer")  # kept open: GC would close it
    dead = broker(n2)

    async def registered() -> bool:
        return bool((await broker(n0).presence.lookup(["cust-d"]))["cust-d"])

    await eventually(registered)
    old_version = broker(n0).membership.ring.version
    # n2 stops beating without cleaning up (as if killed): cancel its tasks only.
    tasks = [*dead._tasks, dead.membership._task, dead.presence._task]
    for task in tasks:
        assert task is not None
        task.cancel()

    async def purged() -> bool:
        rings_shrunk = all(len(broker(s).membership.ring) == 2 for s in (n0, n1))
        left = (await broker(n0).presence.lookup(["cust-d"]))["cust-d"]
        return rings_shrunk and not left

    await eventually(purged, timeout=15)
    assert broker(n0).membership.ring.version == broker(n1).membership.ring.version
    assert broker(n0).membership.ring.version != old_version
    members = await broker(n0).client.zrange(rc.MEMBERS, 0, -1)
    assert dead.membership.incarnation.encode() not in members
    await customer.close()


async def test_nodes_agree_on_the_ring_and_weights_shape_it(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    nodes = [*(await start_nodes(2)), *(await start_nodes(1, node_weight=2.0))]
    versions = {broker(s).membership.ring.version for s in nodes}
    assert len(versions) == 1
    ring = broker(nodes[0]).membership.ring
    assert ring.points_of("n2") == 2 * ring.points_of("n0")


async def test_the_subscription_is_on_the_server_that_carries_the_nodes_channel(
    start_nodes: StartNodes,
) -> None:
    (n0,) = await start_nodes(1)
    b = broker(n0)
    host, port = b.fast.address(b.channel)
    direct = rc.standalone(host, port, rc.parse_url(b.url))
    try:
        if b.cluster:  # sharded pub/sub: only the slot's master knows the subscription
            counts = await direct.execute_command("PUBSUB", "SHARDNUMSUB", b.channel)
        else:
            counts = await direct.execute_command("PUBSUB", "NUMSUB", b.channel)
        assert [rc.text(x) if isinstance(x, bytes) else x for x in counts] == [b.channel, 1]
    finally:
        await direct.aclose()


async def test_redis_server_helper_is_used(redis_server: RedisServer) -> None:
    assert redis_server.running


async def test_two_tabs_on_two_nodes_opening_at_once_get_one_conversation(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, n1 = await start_nodes(2)
    for round_ in range(5):
        user = f"cust-t{round_}"
        tab0 = await connect_to(n0, user, "customer")
        tab1 = await connect_to(n1, user, "customer")
        replies = await asyncio.gather(
            tab0.request({"op": "open", "id": "o"}), tab1.request({"op": "open", "id": "o"})
        )
        convs = {r["conversation"]["conv"] for r in replies}
        assert len(convs) == 1, replies
        await tab0.close()
        await tab1.close()


async def test_a_supervisor_watching_on_one_node_sees_a_conversation_served_on_another(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, n1 = await start_nodes(2)
    boss = await connect_to(n0, "boss", "admin")
    agent = await connect_to(n1, "agent-w", "agent")
    customer = await connect_to(n1, "cust-w", "customer")
    conv = await open_conversation(agent, "cust-w")
    watch = await boss.request({"op": "watch", "id": "w", "conv": conv})
    assert watch["op"] == "conversation", watch

    async def both_nodes_know() -> bool:
        return all("boss" in s.node.desk.watchers.get(conv, ()) for s in (n0, n1))

    await eventually(both_nodes_know)
    ack = await customer.request(send(conv, 1, "seen by the boss"))
    push = await boss.recv_op("message")
    assert (push["seq"], push["body"]["text"]) == (ack["seq"], "seen by the boss")
    await boss.request({"op": "watch", "id": "u", "conv": conv, "on": False})

    async def both_nodes_forget() -> bool:
        return not any(conv in s.node.desk.watchers for s in (n0, n1))

    await eventually(both_nodes_forget)
    await boss.close()
    await agent.close()
    await customer.close()


async def test_nodes_advertise_the_url_they_listen_on(start_nodes: StartNodes) -> None:
    (n0,) = await start_nodes(1)  # port 0: the advertised URL has the bound port
    (n1,) = await start_nodes(1, advertise_url="http://kefu-1.kefu.svc:8080")
    assert broker(n0).membership.url == n0.url and not n0.url.endswith(":0")
    assert broker(n1).membership.url == "http://kefu-1.kefu.svc:8080"

    async def published() -> bool:
        info = broker(n1).membership.member_info
        urls = {v.get("url") for v in info.values()}
        return urls == {n0.url, "http://kefu-1.kefu.svc:8080"}

    await eventually(published)


async def test_connections_per_user_count_across_nodes(
    start_nodes: StartNodes, http: aiohttp.ClientSession
) -> None:
    n0, n1 = await start_nodes(2, max_connections_per_user=2)
    url0 = f"{n0.url}/ws?user_id=cust-c&token={token('cust-c', 'customer')}"
    url1 = f"{n1.url}/ws?user_id=cust-c&token={token('cust-c', 'customer')}"
    first = await http.ws_connect(url0)
    assert "hello" in (await first.receive(timeout=5)).data
    second = await http.ws_connect(url1)
    assert "hello" in (await second.receive(timeout=5)).data

    async def both_registered() -> bool:
        found = await broker(n0).presence.lookup(["cust-c"])
        return len(found["cust-c"]) == 2

    await eventually(both_registered)
    third = await http.ws_connect(url0)  # one on each node already: one too many
    refused = await third.receive(timeout=5)
    assert '"too_many_connections"' in refused.data
    await third.receive(timeout=5)
    assert third.close_code == 4504
    for ws in (first, second, third):
        await ws.close()


async def test_a_node_whose_entry_vanished_rewrites_its_presence(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, _ = await start_nodes(2)
    customer = await connect_to(n0, "cust-v", "customer")
    b0 = broker(n0)

    async def registered() -> bool:
        return bool((await b0.presence.lookup(["cust-v"]))["cust-v"])

    await eventually(registered)
    # What another node does to one that stopped beating for longer than node_ttl:
    await b0.presence.purge(b0.membership.incarnation)
    await b0.client.zrem(rc.MEMBERS, b0.membership.incarnation)
    assert not await registered()
    await eventually(registered)  # its next heartbeat finds the entry gone and rewrites
    await customer.close()


async def test_a_node_that_stops_takes_its_agents_connections_with_it(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    n0, n1 = await start_nodes(2)
    await n0.node.desk.save_agent(Agent(id="agent-s", name="S", capacity=2, groups=("general",)))
    agent = await connect_to(n1, "agent-s", "agent")

    async def connections() -> int:
        state = await n0.node.routing.agent("agent-s")
        return -1 if state is None else state.connections

    async def connected() -> bool:
        return await connections() == 1

    await eventually(connected)
    await n1.stop()
    assert await connections() == 0
    await agent.close()


async def test_queue_positions_come_from_the_groups_owner_with_the_clusters_pace(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    nodes = await start_nodes(2, queue_update_interval=0.02)
    owner_id = broker(nodes[0]).membership.ring.owner_of_partition("queue", "general")
    owner = next(s for s in nodes if s.node.config.node_id == owner_id)
    here = next(s for s in nodes if s is not owner)  # every client is on the other node
    await here.node.desk.save_agent(Agent(id="ag", name="Ag", capacity=1, groups=("general",)))
    agent = await connect_to(here, "ag", "agent")
    customers = [await connect_to(here, f"cu{n}") for n in range(4)]
    convs = []
    for customer in customers:
        convs.append((await customer.request({"op": "open", "id": "o"}))["conversation"]["conv"])

    async def position(n: int, wanted: int, *, estimate: bool = False) -> dict[str, Any]:
        while True:
            frame = await customers[n].recv_op("queue_position")
            if (
                frame["conv"] == convs[n]
                and frame["position"] == wanted
                and (not estimate or frame.get("estimated_wait") is not None)
            ):
                return frame

    await position(1, 1)
    await position(2, 2)
    await position(3, 3)
    assert sample(owner, "kefu_queue_position_pushes_total") >= 3
    assert sample(here, "kefu_queue_position_pushes_total") == 0
    for n in range(2):  # two assignments made on `here`: the owner learns the pace
        resolved = await agent.request({"op": "resolve", "id": f"r{n}", "conv": convs[n]})
        assert resolved["conversation"]["state"] == "resolved", resolved
        if n == 0:
            await position(2, 1)  # the next one was assigned
    await position(3, 1, estimate=True)
    assert sample(here, "kefu_queue_position_pushes_total") == 0
    for client in [agent, *customers]:
        await client.close()


async def test_one_desk_step_at_a_time_per_conversation_across_nodes(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    """A customer on two devices, on two nodes, answers a waiting conversation from both
    at once: both messages are taken (one reply event), neither gets invalid_transition
    for having decided on the same stale state."""
    n0, n1 = await start_nodes(2)
    await n0.node.desk.save_agent(Agent(id="ag", name="Ag", capacity=2, groups=("general",)))
    agent = await connect_to(n0, "ag", "agent")
    phone = await connect_to(n0, "cu")
    laptop = await connect_to(n1, "cu")
    conv = (await phone.request({"op": "open", "id": "o"}))["conversation"]["conv"]
    await agent.recv_op("conversation")
    for round_ in range(8):
        waiting = await agent.request({"op": "wait", "id": f"w{round_}", "conv": conv})
        assert waiting["conversation"]["state"] == "waiting", waiting
        acks = await asyncio.gather(
            phone.request(send(conv, 2 * round_)), laptop.request(send(conv, 2 * round_ + 1))
        )
        assert [a["op"] for a in acks] == ["ack", "ack"], acks
    for client in (agent, phone, laptop):
        await client.close()


async def test_a_send_authorised_on_a_stale_hint_is_decided_again(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    """Node n1 keeps the conversation as it last saw it (assigned to ag); n0 changes it
    (wait, then transfer away). The next sends through n1 follow the fresh state: the
    customer's answers the wait, the old agent's is refused, nothing slips through."""
    n0, n1 = await start_nodes(2)
    for agent_id in ("ag", "other"):
        await n0.node.desk.save_agent(
            Agent(id=agent_id, name=agent_id, capacity=5, groups=("general",))
        )
    ag_there = await connect_to(n0, "ag", "agent")
    ag_here = await connect_to(n1, "ag", "agent")
    other = await connect_to(n0, "other", "agent")
    customer = await connect_to(n1, "cu")
    await other.request({"op": "status", "id": "s", "status": "away"})
    conv = (await customer.request({"op": "open", "id": "o"}))["conversation"]["conv"]
    await ag_there.recv_op("conversation")
    assert (await ag_here.request(send(conv, 1)))["op"] == "ack"  # n1's hint: assigned to ag
    assert (await customer.request(send(conv, 2)))["op"] == "ack"

    waiting = await ag_there.request({"op": "wait", "id": "w", "conv": conv})
    assert waiting["conversation"]["state"] == "waiting"
    assert (await customer.request(send(conv, 3)))["op"] == "ack"
    state = await n0.node.store.get_conversation(conv, fresh=True)
    assert state is not None and state.state.value == "assigned"  # the customer answered
    assert sample(n1, "kefu_stale_sends_total") >= 1

    await other.request({"op": "status", "id": "s2", "status": "online"})
    moved = await ag_there.request({"op": "transfer", "id": "t", "conv": conv, "agent": "other"})
    assert moved["op"] == "conversation", moved
    refused = await ag_here.request(send(conv, 4))
    assert refused["op"] == "error" and refused["code"] == "forbidden", refused
    texts = [m.body for m in await n0.node.store.messages_after(conv, 0, 100) if m.type == "text"]
    assert len(texts) == 3
    for client in (ag_there, ag_here, other, customer):
        await client.close()


async def assigned_to(agent: RawClient, conv: str) -> None:
    """Wait for the push that gives ``conv`` to the agent."""
    while True:
        frame = await agent.recv_op("conversation")
        info = frame["conversation"]
        if info["conv"] == conv and info.get("agent") is not None:
            return


async def test_a_message_into_a_closed_conversation_and_an_open_on_another_node_make_one(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    """The customer's phone (n0) writes into a closed conversation while the laptop (n1)
    opens a new one: both end up in the same open conversation."""
    n0, n1 = await start_nodes(2)
    await n0.node.desk.save_agent(Agent(id="ag", name="Ag", capacity=9, groups=("general",)))
    agent = await connect_to(n0, "ag", "agent")
    phone = await connect_to(n0, "cu")
    laptop = await connect_to(n1, "cu")
    for round_ in range(4):
        conv = (await phone.request({"op": "open", "id": f"o{round_}"}))["conversation"]["conv"]
        await assigned_to(agent, conv)
        closed = await agent.request({"op": "close", "id": f"c{round_}", "conv": conv})
        assert closed["conversation"]["state"] == "closed", closed
        ack, opened = await asyncio.gather(
            phone.request(send(conv, round_)),
            laptop.request({"op": "open", "id": f"l{round_}"}),
        )
        assert ack["op"] == "ack", ack
        assert opened["op"] == "conversation", opened
        assert ack["conv"] == opened["conversation"]["conv"]  # one open conversation
        await assigned_to(agent, ack["conv"])
        done = await agent.request(
            {"op": "close", "id": f"d{round_}", "conv": opened["conversation"]["conv"]}
        )
        assert done["conversation"]["state"] == "closed", done
    for client in (agent, phone, laptop):
        await client.close()


async def test_sends_decided_again_keep_the_order_they_were_sent_in(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    """Several sends in a row through a node whose copy of the conversation is stale: each
    is decided again, and their seqs follow the order they were sent in."""
    n0, n1 = await start_nodes(2)
    await n0.node.desk.save_agent(Agent(id="ag", name="Ag", capacity=5, groups=("general",)))
    agent = await connect_to(n0, "ag", "agent")
    customer = await connect_to(n1, "cu")
    conv = (await customer.request({"op": "open", "id": "o"}))["conversation"]["conv"]
    await assigned_to(agent, conv)
    for round_ in range(3):
        assert (await customer.request(send(conv, 100 + round_)))["op"] == "ack"  # n1's hint
        waiting = await agent.request({"op": "wait", "id": f"w{round_}", "conv": conv})
        assert waiting["conversation"]["state"] == "waiting", waiting
        ids = [10 * round_ + k for k in range(5)]
        for n in ids:
            await customer.send(send(conv, n))
        acks: dict[int, dict[str, Any]] = {}
        while len(acks) < len(ids):
            frame = await customer.recv()
            if frame.get("id") in ids:
                assert frame["op"] == "ack", frame
                acks[frame["id"]] = frame
        seqs = [acks[n]["seq"] for n in ids]
        assert seqs == sorted(seqs), seqs  # sent order is seq order
    assert sample(n1, "kefu_stale_sends_total") >= 1
    for client in (agent, customer):
        await client.close()


async def test_a_burst_reaches_the_other_node_in_seq_order_each_message_once(
    start_nodes: StartNodes, connect_to: Connect
) -> None:
    """Many sends at once from both ends: the delivery rounds overlap (one round's
    publishes travel with the next round's lookups), and each side still gets the other's
    messages once each, in seq order."""
    n0, n1 = await start_nodes(2, rate_per_second=1000.0, rate_burst=1000)
    customer = await connect_to(n0, "cust-b", "customer")
    agent = await connect_to(n1, "agent-b", "agent")
    conv = await open_conversation(agent, "cust-b")
    assert (await customer.recv_op("conversation"))["conversation"]["conv"] == conv
    count = 150
    for n in range(1, count + 1):
        await (customer if n % 2 else agent).send(send(conv, n))

    async def pushes(client: RawClient, sender: str) -> list[int]:
        seqs: list[int] = []
        while len(seqs) < count // 2:
            frame = await client.recv_op("message")
            if frame["sender"] == sender:
                seqs.append(frame["seq"])
        return seqs

    to_agent, to_customer = await asyncio.gather(
        pushes(agent, "cust-b"), pushes(customer, "agent-b")
    )
    for seqs in (to_agent, to_customer):
        assert seqs == sorted(set(seqs)) and len(seqs) == count // 2, seqs
    assert sorted(to_agent + to_customer) == list(range(1, count + 1))
    assert sample(n0, "kefu_cluster_deliveries_total", path="received") >= count // 2
