"""The message-store interface: Kefu's system of record for conversations and messages.

Contract every implementation keeps (tests/integration/test_store_contract.py checks it):

* :meth:`MessageStore.submit`'s future resolves only after the message is durably committed;
  an exception means nothing was acknowledged and the caller may retry.
* ``seq`` is per conversation, starts at 1 and goes up by exactly 1, never repeated.
* ``(conv, sender, client_msg_id)`` is idempotent: appending it again returns the stored
  message with ``duplicate=True`` and stores nothing.
* Failures are raised as :class:`kefu.errors.StoreError` (retryable), never as driver errors.
"""

from __future__ import annotations

import abc
import asyncio

from kefu.model import Conversation, ConversationSummary, NewMessage, StoredMessage


class MessageStore(abc.ABC):
    """Durable conversations, participants, messages and read marks."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open connections and apply the schema; raise StoreError when unreachable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish in-flight writes (their callers get their results), then release."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError unless the store can serve reads and writes now."""

    @abc.abstractmethod
    def submit(self, message: NewMessage) -> asyncio.Future[StoredMessage]:
        """Queue one message for durable storage; the future resolves after the commit.

        The call, not the await, fixes the order: of two messages submitted to one
        conversation, the one submitted first gets the lower seq. Group commit batches
        concurrent submissions into one transaction.
        """

    async def append(self, message: NewMessage) -> StoredMessage:
        """Store one message durably and return it with its seq."""
        return await self.submit(message)

    @abc.abstractmethod
    async def create_conversation(
        self,
        *,
        customer_id: str,
        agent_id: str | None = None,
        group_id: str | None = None,
        context_type: str | None = None,
        context: bytes | None = None,
    ) -> Conversation:
        """Create a conversation; it is assigned when ``agent_id`` is given, else queued."""

    @abc.abstractmethod
    async def get_conversation(self, conv_id: str) -> Conversation | None:
        """The conversation, or None when it does not exist."""

    def cached_conversation(self, conv_id: str) -> Conversation | None:
        """The conversation if it is at hand without I/O (a cache hit), else None."""
        return None

    @abc.abstractmethod
    async def list_conversations(self, user_id: str, *, limit: int) -> list[ConversationSummary]:
        """The user's conversations (as customer or agent), most recently active first."""

    @abc.abstractmethod
    async def messages_after(self, conv_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Messages with seq > after_seq, ascending, at most ``limit``."""

    @abc.abstractmethod
    async def messages_before(
        self, conv_id: str, before_seq: int | None, limit: int
    ) -> list[StoredMessage]:
        """The ``limit`` messages just before ``before_seq`` (latest when None), ascending."""

    @abc.abstractmethod
    async def last_seq(self, conv_id: str) -> int:
        """The highest seq stored in the conversation (0 when empty)."""

    @abc.abstractmethod
    async def mark_read(self, conv_id: str, user_id: str, seq: int) -> int:
        """Raise the user's read mark to ``seq`` (never lower it); return the mark."""
