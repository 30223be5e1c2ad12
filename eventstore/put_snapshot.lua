-- flowlog: store a run's snapshot; it expires with the run (the head's remaining TTL).
--
-- KEYS: 1 snapshot, 2 head.
-- ARGV: 1 seq, 2 version, 3 state bytes.

redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'version', ARGV[2], 'state', ARGV[3])
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
return 1
