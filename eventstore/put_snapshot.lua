-- flowlog: store a run's snapshot; it expires with the run (the head's remaining TTL).
--
-- KEYS: 1 snapshot, 2 head.
-- ARGV: 1 seq, 2 version, 3 state bytes.
--
-- A snapshot of the same state version and a later seq is kept: a checkpointer that folded
-- an old batch (entries claimed from a dead replica) must not take the run's latest back.

local current = redis.call('HMGET', KEYS[1], 'seq', 'version')
if current[1] and current[2] == ARGV[2] and tonumber(current[1]) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'version', ARGV[2], 'state', ARGV[3])
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
return 1
