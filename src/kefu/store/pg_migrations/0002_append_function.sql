-- Kefu on PostgreSQL, schema 2: a batch of appends in one round trip.
--
-- kefu_append(...) takes a batch of messages as parallel arrays (job k is element k of
-- every array; no two jobs share a (conversation, sender, client_msg_id) key: the caller
-- maps repeats within a batch itself) and returns one row per job, in job order:
--
--   outcome  'stored'     a new message: seq, msg_id and ts are its own
--            'duplicate'  a resend: the row of the message stored earlier (any node)
--            'not_found'  no such conversation
--            'stale'      the conversation's state or agent is no longer what the sender
--                         was authorised against (expect_state / expect_agent, when
--                         given): nothing stored, no seq used; cur_state / cur_agent say
--                         what they are now
--
-- It first locks the batch's conversation rows in id order (two nodes' batches never
-- deadlock), then, in a second statement that sees everything committed before the locks
-- were granted, decides each job, takes the seqs from conversations.last_seq (contiguous
-- per conversation, in job order), inserts the messages and advances last_seq. Called
-- alone it is its own transaction; inside a transaction it is part of it. A resend that
-- another node commits between the two makes the insert fail on the unique index: the
-- caller reruns the batch, which then finds it.

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
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM conversations c WHERE c.id = ANY(j_conv) ORDER BY c.id FOR UPDATE;
    RETURN QUERY
    WITH job AS (
        SELECT *
        FROM unnest(
            j_conv, j_sender, j_role, j_cmid, j_type, j_body, j_visibility,
            j_expect_state, j_expect_agent, j_msg_id
        ) WITH ORDINALITY AS t(
            conv, sender, role, cmid, mtype, mbody, vis, expect_state, expect_agent, mid, n
        )
    ),
    earlier AS (
        SELECT j.n, m.seq, m.msg_id, m.sender_role, m.type, m.body, m.ts, m.visibility
        FROM job j
        JOIN messages m
          ON m.conversation_id = j.conv AND m.sender_id = j.sender
         AND m.client_msg_id = j.cmid
    ),
    verdict AS (
        SELECT
            j.*,
            c.last_seq,
            c.state AS now_state,
            c.agent_id AS now_agent,
            CASE
                WHEN e.n IS NOT NULL THEN 'duplicate'
                WHEN c.id IS NULL THEN 'not_found'
                WHEN j.expect_state IS NOT NULL
                     AND (c.state IS DISTINCT FROM j.expect_state
                          OR c.agent_id IS DISTINCT FROM j.expect_agent) THEN 'stale'
                ELSE 'stored'
            END AS result
        FROM job j
        LEFT JOIN earlier e ON e.n = j.n
        LEFT JOIN conversations c ON c.id = j.conv
    ),
    numbered AS (
        SELECT v.*, v.last_seq + row_number() OVER (PARTITION BY v.conv ORDER BY v.n) AS new_seq
        FROM verdict v
        WHERE v.result = 'stored'
    ),
    inserted AS (
        INSERT INTO messages (
            conversation_id, seq, msg_id, sender_id, sender_role, client_msg_id, type, body,
            ts, visibility
        )
        SELECT conv, new_seq, mid, sender, role, cmid, mtype, mbody, j_ts, vis FROM numbered
        RETURNING 1
    ),
    advanced AS (
        UPDATE conversations c
        SET last_seq = c.last_seq + d.added
        FROM (SELECT conv, count(*) AS added FROM numbered GROUP BY conv) d
        WHERE c.id = d.conv
        RETURNING 1
    )
    SELECT
        v.n,
        v.result,
        COALESCE(nb.new_seq, e.seq),
        CASE WHEN v.result = 'duplicate' THEN e.msg_id ELSE v.mid END,
        CASE WHEN v.result = 'duplicate' THEN e.sender_role ELSE v.role END,
        CASE WHEN v.result = 'duplicate' THEN e.type ELSE v.mtype END,
        CASE WHEN v.result = 'duplicate' THEN e.body ELSE v.mbody END,
        CASE WHEN v.result = 'duplicate' THEN e.ts ELSE j_ts END,
        CASE WHEN v.result = 'duplicate' THEN e.visibility ELSE v.vis END,
        v.now_state,
        v.now_agent
    FROM verdict v
    LEFT JOIN numbered nb ON nb.n = v.n
    LEFT JOIN earlier e ON e.n = v.n
    ORDER BY v.n;
END;
$$;
