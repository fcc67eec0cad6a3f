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
import dataclasses
from collections.abc import Collection, Mapping

from kefu.model import (
    Agent,
    CannedResponse,
    Conversation,
    ConversationState,
    ConversationSummary,
    Group,
    NewMessage,
    StoredMessage,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConversationFilter:
    """Which conversations a search returns (every given field must match)."""

    states: tuple[ConversationState, ...] = ()
    group_id: str | None = None
    agent_id: str | None = None
    customer_id: str | None = None
    #: Text that a message (visible to the searcher) of the conversation contains.
    text: str | None = None
    include_internal: bool = False
    #: Paging cursor: conversations ordered after this (updated_at ms, id); None: first page.
    after: tuple[int, str] | None = None
    created_from: int | None = None
    created_to: int | None = None


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
    async def get_conversation(self, conv_id: str, *, fresh: bool = False) -> Conversation | None:
        """The conversation, or None when it does not exist; ``fresh`` bypasses caches."""

    def cached_conversation(self, conv_id: str) -> Conversation | None:
        """The conversation if it is at hand without I/O (a cache hit), else None."""
        return None

    def conversation_hint(self, conv_id: str) -> Conversation | None:
        """The conversation as last seen here, without I/O, for authorising a message
        whose append carries :attr:`NewMessage.expect`: it may be stale where several
        nodes write (the append then fails with StaleConversation). Else None."""
        return self.cached_conversation(conv_id)

    def forget_hint(self, conv_id: str) -> None:
        """Drop a hint that proved stale."""
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

    # -- customer service -----------------------------------------------------------------

    @abc.abstractmethod
    async def transition(
        self,
        conv_id: str,
        *,
        from_states: Collection[ConversationState],
        to_state: ConversationState,
        event_body: bytes,
        sender: str,
        sender_role: str,
        if_agent: str | None = None,
        sets: Mapping[str, str | int | None] | None = None,
        stamps: Collection[str] = (),
        first_stamps: Collection[str] = (),
    ) -> tuple[Conversation, StoredMessage, str | None]:
        """Compare-and-set a lifecycle transition and record its event, in one transaction.

        Applies only if the conversation's state is in ``from_states`` (and it is assigned
        to ``if_agent`` when given); otherwise raises InvalidTransition and changes
        nothing. ``event_body`` is stored as a ``system`` message. Returns the updated
        conversation, the event message and the agent it had just before (the one to
        release, whatever a caller read earlier).
        """

    @abc.abstractmethod
    async def successor(self, conv_id: str) -> tuple[Conversation, bool]:
        """The queued conversation that continues a closed one; created (True) if none yet.

        Idempotent: every call for one closed conversation returns the same successor.
        """

    @abc.abstractmethod
    async def link_successor(self, conv_id: str, successor_id: str) -> None:
        """Record ``successor_id`` as the continuation of closed ``conv_id`` (unless it has
        one already): later messages to the closed one follow the same link."""

    @abc.abstractmethod
    async def stamp_response(self, conv_id: str, agent_id: str) -> Conversation | None:
        """Record the assigned agent's first reply (accepts the conversation too)."""

    @abc.abstractmethod
    async def mark_left_message(self, conv_id: str) -> None:
        """The queued customer was offered leave-a-message (kept across restarts; the next
        transition out of the queue, or back into it, clears it)."""

    @abc.abstractmethod
    async def set_labels(self, conv_id: str, labels: Collection[str]) -> Conversation:
        """Replace the conversation's labels."""

    @abc.abstractmethod
    async def rate(self, conv_id: str, customer_id: str, score: int, comment: str) -> Conversation:
        """Store the customer's CSAT rating of a resolved conversation, once.

        Raises InvalidTransition unless resolved or closed after a resolve, Forbidden when
        ``customer_id`` is not its customer and KefuError(already_rated) on a second rating.
        """

    @abc.abstractmethod
    async def search_conversations(
        self, where: ConversationFilter, *, limit: int
    ) -> list[Conversation]:
        """Conversations matching ``where``, most recently updated first (ties: by id)."""

    @abc.abstractmethod
    async def idle_conversations(self, before: int) -> list[tuple[str, int]]:
        """Assigned or waiting conversations whose last public chat message came from the
        agent side before ``before`` (ms): (conversation id, that message's ts)."""

    @abc.abstractmethod
    async def latest_agent(self, customer_id: str) -> str | None:
        """The agent of the customer's most recent conversation that had one."""

    @abc.abstractmethod
    async def save_group(self, group: Group) -> Group:
        """Create or replace a skill group."""

    @abc.abstractmethod
    async def list_groups(self) -> list[Group]: ...

    @abc.abstractmethod
    async def save_agent(self, agent: Agent) -> Agent:
        """Create or replace an agent's settings and group memberships."""

    @abc.abstractmethod
    async def list_agents(self) -> list[Agent]: ...

    @abc.abstractmethod
    async def save_canned(self, canned: CannedResponse) -> CannedResponse: ...

    @abc.abstractmethod
    async def delete_canned(self, canned_id: str) -> bool: ...

    @abc.abstractmethod
    async def list_canned(self, group_ids: Collection[str] | None) -> list[CannedResponse]:
        """Canned responses of these groups and the global ones (all when None)."""
