-- Append webhook events to one partition's stream, up to its capacity.
--
-- KEYS[1]  the partition's stream (kefu:{whN}:events)
-- ARGV[1]  capacity: entries the stream may hold (events not yet settled, plus at most
--          one settled entry the cursor still points at)
-- ARGV[2…] event bodies (JSON), in emit order
--
-- Returns how many of the bodies were added, from the first: once the stream is full the
-- rest are refused, never an older event (the caller counts them as dropped).
local capacity = tonumber(ARGV[1])
local length = redis.call('XLEN', KEYS[1])
local added = 0
for i = 2, #ARGV do
    if length >= capacity then
        break
    end
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
    length = length + 1
    added = added + 1
end
return added
