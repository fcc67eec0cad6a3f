-- Kefu on PostgreSQL, schema 3: kefu_append keeps its plans.
--
-- Nodes open their connections with plan_cache_mode = force_custom_plan (the store's
-- one-off statements are planned for the values they get). For kefu_append that meant
-- planning its two statements, a CTE of six parts, on every call: about a quarter of the
-- database's CPU per stored message. Its plans do not depend on the values (every join
-- goes through a primary key or the idempotency index), so inside the function PostgreSQL
-- may keep a generic plan. A cached plan is made again when ANALYZE changes a table's
-- statistics, so one made while the tables were small does not outlive them.
ALTER FUNCTION kefu_append(
    TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], BYTEA[], TEXT[], TEXT[], TEXT[], TEXT[], BIGINT
) SET plan_cache_mode = auto;
