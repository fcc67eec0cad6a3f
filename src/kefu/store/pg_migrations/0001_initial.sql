-- Kefu on PostgreSQL, schema 1: the same tables as the embedded SQLite store (schema 2),
-- plus conversations.last_seq, the per-conversation seq counter. A message's seq is taken
-- from that counter in the transaction that stores the message, under the conversation
-- row's lock, so it can never rewind whatever happens to Redis; the primary key
-- (conversation_id, seq) guards it a second time.

CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    agent_id TEXT,
    group_id TEXT,
    state TEXT NOT NULL,
    context_type TEXT,
    context BYTEA,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    labels TEXT NOT NULL DEFAULT '[]',
    assigned_at BIGINT,
    accepted_at BIGINT,
    first_assigned_at BIGINT,
    first_response_at BIGINT,
    resolved_at BIGINT,
    closed_at BIGINT,
    close_reason TEXT,
    previous_agent_id TEXT,
    successor_id TEXT,
    csat_score INTEGER,
    csat_comment TEXT,
    csat_at BIGINT,
    left_message_at BIGINT,
    last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX conversations_customer ON conversations (customer_id, updated_at);
CREATE INDEX conversations_agent ON conversations (agent_id, updated_at);
CREATE INDEX conversations_group_state ON conversations (group_id, state);
CREATE INDEX conversations_state ON conversations (state, updated_at);
CREATE INDEX conversations_created ON conversations (created_at);

CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    welcome TEXT NOT NULL,
    max_queue INTEGER NOT NULL,
    max_wait DOUBLE PRECISION NOT NULL,
    schedule TEXT,
    out_of_hours_message TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE agent_groups (
    agent_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    PRIMARY KEY (agent_id, group_id)
);
CREATE INDEX agent_groups_group ON agent_groups (group_id);

CREATE TABLE canned_responses (
    id TEXT PRIMARY KEY,
    group_id TEXT,
    shortcut TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE participants (
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    read_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX participants_user ON participants (user_id);

CREATE TABLE messages (
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    msg_id TEXT NOT NULL,
    sender_id TEXT NOT NULL,
    sender_role TEXT NOT NULL,
    client_msg_id TEXT,
    type TEXT NOT NULL,
    body BYTEA NOT NULL,
    ts BIGINT NOT NULL,
    visibility TEXT NOT NULL DEFAULT 'all',
    PRIMARY KEY (conversation_id, seq)
);
CREATE UNIQUE INDEX messages_idempotency ON messages (conversation_id, sender_id, client_msg_id);
