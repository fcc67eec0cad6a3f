-- Kefu on PostgreSQL, schema 3: kefu_append keeps one plan, linear in the batch, and can
-- leave a conversation another writer holds for the caller's next batch.
--
-- kefu_append(..., j_ts, j_skip_locked) takes the arrays of schema 2 and one flag:
--
--   j_skip_locked false  as schema 2: lock every conversation of the batch, in id order,
--                        waiting for other writers' transactions to end
--   j_skip_locked true   lock only what no other transaction holds now, and answer
--                        'locked' (nothing stored, no seq used) for the jobs of the others:
--                        the caller runs them again in its next batch. Two nodes both
--                        writing batches that span many conversations (the agent and the
--                        customer of a conversation on different nodes) otherwise queue
--                        every batch behind the other's fsync: a lock convoy in which the
--                        cluster commits one batch at a time. The locks are then taken in
--                        the statement that stores: a resend that another node commits
--                        while it runs fails it on the idempotency index, and the caller
--                        runs the batch again (as schema 2 between its two statements).
--
-- Its rows carry msg_id, sender_role, type, body, ts and visibility for a duplicate only
-- (the message stored earlier): for a stored job the caller knows them, it sent them.
--
-- The 11-argument kefu_append of schema 2 stays (nodes of schema 2 call it during a
-- rolling upgrade): this one with j_skip_locked false, its rows filled in as schema 2's.
--
-- Plans: nodes open their connections with plan_cache_mode = force_custom_plan (the
-- store's one-off statements are planned for the values they get). For kefu_append that
-- meant planning its CTE of six parts on every call: about a quarter of the database's
-- CPU per stored message. Its plan now is made once per connection (and again whenever
-- ANALYZE changes the tables' statistics), and is written so that no estimate can make it
-- slow:
--
-- * every row it reads it finds by a key, through LATERAL subqueries that run once per
--   job (OFFSET 0 keeps the planner from turning them into joins): a resend by the
--   idempotency index, the conversation by its primary key. Left to its estimates (a
--   generic plan sees a batch of 10) the planner chose hash joins over sequential scans of
--   conversations, which grow with the table and with the dead row versions every
--   append's UPDATE of last_seq leaves behind;
-- * no CTE is joined to another (a generic plan joins them with nested loops, quadratic in
--   a batch of up to 1,000): the seqs come from a running count over the batch.
--
-- The other rules are those of schema 2 (0002_append_function.sql).
CREATE FUNCTION kefu_append(
    j_conv TEXT[],
    j_sender TEXT[],
    j_role TEXT[],
    j_cmid TEXT[],
    j_type TEXT[],
    j_body BYTEA[],
    j_visibility TEXT[],
    j_expect_state TEXT[],
    j_expect_agent TEXT[],
    j_msg_id TEXT[],
    j_ts BIGINT,
    j_skip_locked BOOLEAN
) RETURNS TABLE (
    k BIGINT,
    outcome TEXT,
    seq BIGINT,
    msg_id TEXT,
    sender_role TEXT,
    type TEXT,
    body BYTEA,
    ts BIGINT,
    visibility TEXT,
    cur_state TEXT,
    cur_agent TEXT
) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    IF NOT j_skip_locked THEN
        PERFORM 1 FROM conversations c WHERE c.id = ANY(j_conv) ORDER BY c.id FOR UPDATE;
    END IF;
    -- Each job locks its conversation (again: a lock this transaction holds is granted at
    -- once) and skips it when another transaction holds it. A row locked here is read as
    -- its newest committed version, whatever this statement's snapshot.
    RETURN QUERY
    WITH verdict AS (
        SELECT
            j.*,
            c.last_seq,
            c.state AS now_state,
            c.agent_id AS now_agent,
            e.seq AS e_seq,
            e.msg_id AS e_msg_id,
            e.sender_role AS e_role,
            e.type AS e_type,
            e.body AS e_body,
            e.ts AS e_ts,
            e.visibility AS e_vis,
            CASE
                WHEN e.seq IS NOT NULL THEN 'duplicate'
                WHEN c.id IS NULL AND x.id IS NULL THEN 'not_found'
                WHEN c.id IS NULL THEN 'locked'
                WHEN j.expect_state IS NOT NULL
                     AND (c.state IS DISTINCT FROM j.expect_state
                          OR c.agent_id IS DISTINCT FROM j.expect_agent) THEN 'stale'
                ELSE 'stored'
            END AS result
        FROM unnest(
            j_conv, j_sender, j_role, j_cmid, j_type, j_body, j_visibility,
            j_expect_state, j_expect_agent, j_msg_id
        ) WITH ORDINALITY AS j(
            conv, sender, role, cmid, mtype, mbody, vis, expect_state, expect_agent, mid, n
        )
        LEFT JOIN LATERAL (
            SELECT m.seq, m.msg_id, m.sender_role, m.type, m.body, m.ts, m.visibility
            FROM messages m
            WHERE m.conversation_id = j.conv AND m.sender_id = j.sender
              AND m.client_msg_id = j.cmid
            OFFSET 0
        ) e ON true
        LEFT JOIN LATERAL (
            SELECT c.id, c.last_seq, c.state, c.agent_id
            FROM conversations c
            WHERE c.id = j.conv
            FOR UPDATE SKIP LOCKED
        ) c ON true
        LEFT JOIN LATERAL (  -- whether a conversation skipped above exists at all
            SELECT x.id FROM conversations x WHERE c.id IS NULL AND x.id = j.conv OFFSET 0
        ) x ON true
    ),
    numbered AS (
        -- a stored job's seq: last_seq plus the stored jobs of its conversation up to it
        SELECT
            v.*,
            v.last_seq + count(*) FILTER (WHERE v.result = 'stored')
                OVER (PARTITION BY v.conv ORDER BY v.n) AS new_seq
        FROM verdict v
    ),
    inserted AS (
        INSERT INTO messages (
            conversation_id, seq, msg_id, sender_id, sender_role, client_msg_id, type, body,
            ts, visibility
        )
        SELECT conv, new_seq, mid, sender, role, cmid, mtype, mbody, j_ts, vis
        FROM numbered
        WHERE result = 'stored'
        RETURNING 1
    ),
    advanced AS (
        UPDATE conversations c
        SET last_seq = c.last_seq + d.added
        FROM (
            SELECT conv, count(*) AS added FROM numbered WHERE result = 'stored' GROUP BY conv
        ) d
        WHERE c.id = d.conv
        RETURNING 1
    )
    SELECT
        v.n,
        v.result,
        CASE WHEN v.result = 'stored' THEN v.new_seq ELSE v.e_seq END,
        -- a duplicate's message as stored earlier; NULL for the others (the caller sent
        -- what a stored job holds: nothing goes back and forth twice)
        v.e_msg_id,
        v.e_role,
        v.e_type,
        v.e_body,
        v.e_ts,
        v.e_vis,
        CASE WHEN v.result = 'stale' THEN v.now_state END,
        CASE WHEN v.result = 'stale' THEN v.now_agent END
    FROM numbered v
    ORDER BY v.n;
END;
$$;


-- Schema 2's signature, for nodes of schema 2: waits for the locks and answers the message
-- of every stored or duplicate job, as it did.
CREATE OR REPLACE FUNCTION kefu_append(
    j_conv TEXT[],
    j_sender TEXT[],
    j_role TEXT[],
    j_cmid TEXT[],
    j_type TEXT[],
    j_body BYTEA[],
    j_visibility TEXT[],
    j_expect_state TEXT[],
    j_expect_agent TEXT[],
    j_msg_id TEXT[],
    j_ts BIGINT
) RETURNS TABLE (
    k BIGINT,
    outcome TEXT,
    seq BIGINT,
    msg_id TEXT,
    sender_role TEXT,
    type TEXT,
    body BYTEA,
    ts BIGINT,
    visibility TEXT,
    cur_state TEXT,
    cur_agent TEXT
) LANGUAGE sql AS $$
    SELECT
        r.k,
        r.outcome,
        r.seq,
        COALESCE(r.msg_id, j_msg_id[r.k]),
        COALESCE(r.sender_role, j_role[r.k]),
        COALESCE(r.type, j_type[r.k]),
        COALESCE(r.body, j_body[r.k]),
        COALESCE(r.ts, j_ts),
        COALESCE(r.visibility, j_visibility[r.k]),
        r.cur_state,
        r.cur_agent
    FROM kefu_append(
        j_conv, j_sender, j_role, j_cmid, j_type, j_body, j_visibility, j_expect_state,
        j_expect_agent, j_msg_id, j_ts, false
    ) AS r
    ORDER BY r.k
$$;
