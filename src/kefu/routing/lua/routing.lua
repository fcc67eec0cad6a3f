-- Kefu's shared routing state: every change is one call of this script, so each is
-- atomic across all nodes (Redis runs a script to completion before anything else).
--
-- KEYS[1] is "<prefix>agents"; every key touched starts with <prefix>, which carries a
-- hash tag ("kefu:{rt}:"), so the whole routing state lives in one Redis Cluster slot
-- and no script ever crosses slots. ARGV[1] names the operation, the rest are its
-- arguments. Times are Unix milliseconds given by the caller.
--
-- Keys (<p> = prefix):
--   <p>agents            SET    agent ids
--   <p>a:<agent>         HASH   capacity, groups (comma-separated), status, last, disc
--   <p>conn:<agent>      HASH   node incarnation -> open connections there
--   <p>act:<agent>       SET    conversations the agent holds
--   <p>una:<agent>       HASH   conversation -> when assigned (not yet accepted)
--   <p>gm:<group>        SET    agents of the group
--   <p>ql:<group>        LIST   live queue (head first)
--   <p>qb:<group>        LIST   left messages (head first)
--   <p>entries           HASH   conversation -> queue entry (JSON)
--   <p>where             HASH   conversation -> "l:<group>" or "b:<group>"
--   <p>queued            SET    groups with at least one entry
--   <p>built             STRING set once the state is complete (rebuilt from the store)
--   <p>rebuilding        STRING the incarnation rebuilding it, with an expiry

local P = string.sub(KEYS[1], 1, -7)
local op = ARGV[1]

local function akey(id) return P .. "a:" .. id end

local function exists(id) return redis.call("SISMEMBER", P .. "agents", id) == 1 end

local function connections(id)
  local total = 0
  local counts = redis.call("HVALS", P .. "conn:" .. id)
  for _, c in ipairs(counts) do total = total + tonumber(c) end
  return total
end

local function load(id) return redis.call("SCARD", P .. "act:" .. id) end

local function available(id)
  local a = redis.call("HMGET", akey(id), "capacity", "status")
  if not a[1] then return false end
  return a[2] == "online" and connections(id) > 0 and load(id) < tonumber(a[1])
end

local function snapshot(id)
  local a = redis.call("HMGET", akey(id), "capacity", "groups", "status", "last", "disc")
  return {
    id, a[1], a[2], a[3], tostring(connections(id)), a[4], a[5],
    redis.call("SMEMBERS", P .. "act:" .. id),
    redis.call("HGETALL", P .. "una:" .. id),
  }
end

local function remove_entry(conv)
  local where = redis.call("HGET", P .. "where", conv)
  if not where then return nil end
  local raw = redis.call("HGET", P .. "entries", conv)
  local kind, group = string.sub(where, 1, 1), string.sub(where, 3)
  redis.call("LREM", P .. "q" .. kind .. ":" .. group, 1, conv)
  redis.call("HDEL", P .. "entries", conv)
  redis.call("HDEL", P .. "where", conv)
  if redis.call("EXISTS", P .. "ql:" .. group, P .. "qb:" .. group) == 0 then
    redis.call("SREM", P .. "queued", group)
  end
  return {raw, kind}
end

local function give(id, conv, now)
  redis.call("SADD", P .. "act:" .. id, conv)
  redis.call("HSET", P .. "una:" .. id, conv, now)
  redis.call("HSET", akey(id), "last", now)
end

local function assignment(conv, id, e, now)
  return {conv, id, e.group, e.customer, tostring(math.max(0, now - tonumber(e.since)))}
end

-- (load, last, id) ordering: least loaded, then longest since the last assignment.
local function before(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end

local function best(e)
  local excluded = {}
  if type(e.excluded) == "table" then
    for _, x in ipairs(e.excluded) do excluded[x] = true end
  end
  local gm = P .. "gm:" .. e.group
  local prefer = e.prefer
  if type(prefer) == "string" and not excluded[prefer]
      and redis.call("SISMEMBER", gm, prefer) == 1 and available(prefer) then
    return prefer
  end
  local found, found_key, fallback, fallback_key
  for _, id in ipairs(redis.call("SMEMBERS", gm)) do
    if available(id) then
      local key = {load(id), tonumber(redis.call("HGET", akey(id), "last")), id}
      if excluded[id] then
        if fallback == nil or before(key, fallback_key) then fallback, fallback_key = id, key end
      elseif found == nil or before(key, found_key) then
        found, found_key = id, key
      end
    end
  end
  return found or fallback
end

local function err(code) return {"ERR", code} end

-- -- agents ---------------------------------------------------------------------------

if op == "configure" then
  local id, capacity, groups, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
  if exists(id) then
    local old = redis.call("HGET", akey(id), "groups") or ""
    for g in string.gmatch(old, "[^,]+") do redis.call("SREM", P .. "gm:" .. g, id) end
    redis.call("HSET", akey(id), "capacity", capacity, "groups", groups)
  else
    redis.call("SADD", P .. "agents", id)
    redis.call("HSET", akey(id), "capacity", capacity, "groups", groups, "status", "online",
      "last", 0, "disc", now)
  end
  for g in string.gmatch(groups, "[^,]+") do redis.call("SADD", P .. "gm:" .. g, id) end
  return 1

elseif op == "remove" then
  local id = ARGV[2]
  local groups = redis.call("HGET", akey(id), "groups") or ""
  for g in string.gmatch(groups, "[^,]+") do redis.call("SREM", P .. "gm:" .. g, id) end
  redis.call("SREM", P .. "agents", id)
  redis.call("DEL", akey(id), P .. "conn:" .. id, P .. "act:" .. id, P .. "una:" .. id)
  return 1

elseif op == "agent" then
  if not exists(ARGV[2]) then return nil end
  return snapshot(ARGV[2])

elseif op == "agents" then
  local out = {}
  for _, id in ipairs(redis.call("SMEMBERS", P .. "agents")) do out[#out + 1] = snapshot(id) end
  return out

elseif op == "connected" then
  local id, now, node = ARGV[2], tonumber(ARGV[3]), ARGV[4]
  if not exists(id) then return nil end
  if connections(id) == 0 then
    local last = tonumber(redis.call("HGET", akey(id), "last"))
    redis.call("HSET", akey(id), "last", math.max(last, now))
  end
  redis.call("HINCRBY", P .. "conn:" .. id, node, 1)
  redis.call("HSET", akey(id), "disc", "")
  return snapshot(id)

elseif op == "disconnected" then
  local id, now, node = ARGV[2], ARGV[3], ARGV[4]
  if not exists(id) then return nil end
  local here = tonumber(redis.call("HGET", P .. "conn:" .. id, node) or "0")
  if here == 0 then return snapshot(id) end  -- an unmatched extra call changes nothing
  if here == 1 then
    redis.call("HDEL", P .. "conn:" .. id, node)
  else
    redis.call("HINCRBY", P .. "conn:" .. id, node, -1)
  end
  if connections(id) == 0 then redis.call("HSET", akey(id), "disc", now) end
  return snapshot(id)

elseif op == "report" then
  -- This node's connection counts, after the state was lost: ARGV = node, now, id, n, ...
  local node, now = ARGV[2], tonumber(ARGV[3])
  for i = 4, #ARGV, 2 do
    local id, n = ARGV[i], tonumber(ARGV[i + 1])
    if exists(id) then
      local before = connections(id)
      if n > 0 then
        redis.call("HSET", P .. "conn:" .. id, node, n)
      else
        redis.call("HDEL", P .. "conn:" .. id, node)
      end
      local after = connections(id)
      if before == 0 and after > 0 then
        local last = tonumber(redis.call("HGET", akey(id), "last"))
        redis.call("HSET", akey(id), "last", math.max(last, now), "disc", "")
      elseif before > 0 and after == 0 then
        redis.call("HSET", akey(id), "disc", now)
      end
    end
  end
  redis.call("SET", P .. "reported:" .. node, 1)
  return 1

elseif op == "forget_node" then
  -- A node incarnation died: its connections are gone. Returns the agents affected.
  local node, now = ARGV[2], ARGV[3]
  local out = {}
  redis.call("DEL", P .. "reported:" .. node)
  for _, id in ipairs(redis.call("SMEMBERS", P .. "agents")) do
    if redis.call("HDEL", P .. "conn:" .. id, node) == 1 then
      out[#out + 1] = id
      if connections(id) == 0 then redis.call("HSET", akey(id), "disc", now) end
    end
  end
  return out

elseif op == "status" then
  local id, status, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
  if not exists(id) then return err("not_found") end
  local a = redis.call("HMGET", akey(id), "status", "last")
  if status == "online" and a[1] ~= "online" then
    redis.call("HSET", akey(id), "last", math.max(tonumber(a[2]), now))
  end
  redis.call("HSET", akey(id), "status", status)
  return snapshot(id)

-- -- queues ---------------------------------------------------------------------------

elseif op == "enqueue" then
  local conv, group, raw, head, kind = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
  remove_entry(conv)
  redis.call("HSET", P .. "entries", conv, raw)
  redis.call("HSET", P .. "where", conv, kind .. ":" .. group)
  if head == "1" then
    redis.call("LPUSH", P .. "q" .. kind .. ":" .. group, conv)
  else
    redis.call("RPUSH", P .. "q" .. kind .. ":" .. group, conv)
  end
  redis.call("SADD", P .. "queued", group)
  return 1

elseif op == "dequeue" then
  return remove_entry(ARGV[2])

elseif op == "queue" then
  local group = ARGV[2]
  local out = {}
  for _, kind in ipairs({"l", "b"}) do
    for _, conv in ipairs(redis.call("LRANGE", P .. "q" .. kind .. ":" .. group, 0, -1)) do
      out[#out + 1] = {redis.call("HGET", P .. "entries", conv), kind}
    end
  end
  return out

elseif op == "to_backlog" then
  local group, older_than = ARGV[2], tonumber(ARGV[3])
  local out = {}
  for _, conv in ipairs(redis.call("LRANGE", P .. "ql:" .. group, 0, -1)) do
    local raw = redis.call("HGET", P .. "entries", conv)
    if tonumber(cjson.decode(raw).since) < older_than then
      redis.call("LREM", P .. "ql:" .. group, 1, conv)
      redis.call("RPUSH", P .. "qb:" .. group, conv)
      redis.call("HSET", P .. "where", conv, "b:" .. group)
      out[#out + 1] = raw
    end
  end
  return out

-- -- assignment -------------------------------------------------------------------------

elseif op == "assign_next" then
  local group, now = ARGV[2], tonumber(ARGV[3])
  local anyone = false
  for _, id in ipairs(redis.call("SMEMBERS", P .. "gm:" .. group)) do
    if available(id) then anyone = true; break end
  end
  if not anyone then return nil end  -- nobody free: no need to look at the queue
  for _, kind in ipairs({"l", "b"}) do
    for _, conv in ipairs(redis.call("LRANGE", P .. "q" .. kind .. ":" .. group, 0, -1)) do
      local e = cjson.decode(redis.call("HGET", P .. "entries", conv))
      local id = best(e)
      if id then
        remove_entry(conv)
        give(id, conv, now)
        return assignment(conv, id, e, now)
      end
    end
  end
  return nil

elseif op == "pick" then
  local id, conv, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
  local raw = redis.call("HGET", P .. "entries", conv)
  if not raw then return err("not_found") end
  local e = cjson.decode(raw)
  if not exists(id) or redis.call("SISMEMBER", P .. "gm:" .. e.group, id) == 0 then
    return err("not_member")
  end
  if not available(id) then return err("agent_unavailable") end
  remove_entry(conv)
  give(id, conv, now)
  return assignment(conv, id, e, now)

elseif op == "reserve" then
  local id, conv, now, force = ARGV[2], ARGV[3], ARGV[4], ARGV[5] == "1"
  if not exists(id) then
    if force then remove_entry(conv); return 1 end
    return 0
  end
  if redis.call("SISMEMBER", P .. "act:" .. id, conv) == 1 then return 1 end
  if not force and not available(id) then return 0 end
  remove_entry(conv)
  give(id, conv, now)
  return 1

elseif op == "move" then
  local conv, from, to, now, force = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] == "1"
  if not exists(to) then
    if not force then return 0 end
  elseif redis.call("SISMEMBER", P .. "act:" .. to, conv) == 0 then
    if not force and not available(to) then return 0 end
    give(to, conv, now)
  end
  if from ~= "" and from ~= to and exists(from) then
    redis.call("SREM", P .. "act:" .. from, conv)
    redis.call("HDEL", P .. "una:" .. from, conv)
  end
  remove_entry(conv)
  return 1

elseif op == "release" then
  redis.call("SREM", P .. "act:" .. ARGV[2], ARGV[3])
  redis.call("HDEL", P .. "una:" .. ARGV[2], ARGV[3])
  return 1

elseif op == "unlock" then
  -- Release a lock taken with SET <p>lock:<name> <token> NX PX: only by its holder.
  if redis.call("GET", P .. "lock:" .. ARGV[2]) == ARGV[3] then
    redis.call("DEL", P .. "lock:" .. ARGV[2])
    return 1
  end
  return 0

elseif op == "accepted" then
  redis.call("HDEL", P .. "una:" .. ARGV[2], ARGV[3])
  return 1

elseif op == "claim_rebuild" then
  -- The state is missing (no <p>built) and nobody is rebuilding it: this caller
  -- (ARGV[2], its incarnation) does, for at most ARGV[3] ms. One step, so that a node
  -- that saw <p>built missing just before another finished cannot rebuild again.
  if redis.call("EXISTS", P .. "built") == 1 then return 0 end
  if redis.call("SET", P .. "rebuilding", ARGV[2], "NX", "PX", ARGV[3]) then return 1 end
  return 0

elseif op == "rebuilt" then
  redis.call("SET", P .. "built", ARGV[2])
  redis.call("DEL", P .. "rebuilding")
  return 1
end

return redis.error_reply("unknown routing operation " .. tostring(op))
