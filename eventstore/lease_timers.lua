-- flowlog: lease due timers of one partition (move them to now + lease) and return them.
--
-- KEYS: 1 partition timers (sorted set), 2 partition timer payloads (hash).
-- ARGV: 1 now ms, 2 lease until ms, 3.. timer members.
-- Reply: 3 values per leased timer: member, due ms before the lease, payload.
--
-- A member another poller leased since it was listed is no longer due and is left alone.

local now = tonumber(ARGV[1])
local reply = {}
for i = 3, #ARGV do
  local member = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], member)
  if due and tonumber(due) <= now then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member)
    reply[#reply + 1] = member
    reply[#reply + 1] = due
    reply[#reply + 1] = redis.call('HGET', KEYS[2], member) or ''
  end
end
return reply
