"""The happy path over a real socket: open, send, ack, push, sync, read receipt."""

from __future__ import annotations

from tests.conftest import Connect, open_conversation


async def test_send_ack_push_sync(connect: Connect) -> None:
    agent = await connect("agent-1", "agent")
    customer = await connect("cust-1", "customer")
    conv = await open_conversation(agent, "cust-1")
    assert (await customer.recv_op("conversation"))["conversation"]["conv"] == conv

    ack = await customer.request(
        {
            "op": "send",
            "id": 1,
            "conv": conv,
            "client_msg_id": "m1",
            "type": "text",
            "body": {"text": "hello"},
        }
    )
    assert ack["op"] == "ack" and ack["seq"] == 1 and not ack.get("duplicate")
    push = await agent.recv_op("message")
    assert push["seq"] == 1 and push["body"] == {"text": "hello"} and push["sender"] == "cust-1"

    page = await agent.request({"op": "sync", "id": 2, "conv": conv, "after_seq": 0})
    assert [m["seq"] for m in page["messages"]] == [1]
    assert page["has_more"] is False

    ok = await agent.request({"op": "read", "id": 3, "conv": conv, "seq": 1})
    assert ok["op"] == "ok"
    receipt = await customer.recv_op("read")
    assert receipt == {"op": "read", "conv": conv, "user": "agent-1", "seq": 1}


async def test_admin_read_marks_nothing_and_pushes_nothing(connect: Connect) -> None:
    agent = await connect("agent-2", "agent")
    customer = await connect("cust-2", "customer")
    admin = await connect("boss", "admin")
    conv = await open_conversation(agent, "cust-2")
    await customer.recv_op("conversation")
    ack = await customer.request(
        {
            "op": "send",
            "id": 1,
            "conv": conv,
            "client_msg_id": "m1",
            "type": "text",
            "body": {"text": "hi"},
        }
    )
    assert ack["seq"] == 1
    assert (await admin.request({"op": "read", "id": 2, "conv": conv, "seq": 1}))["op"] == "ok"
    # no receipt reached the participants: the customer's next frame is its pong
    await customer.send({"op": "ping", "id": "p"})
    assert (await customer.recv())["op"] == "pong"
    listed = await customer.request({"op": "convs", "id": "c"})
    assert listed["conversations"][0].get("read_seq", 0) == 0
