-- flowlog: acknowledge entries of a consumer group on several streams (feeds or work
-- streams) in one call.
--
-- KEYS: the streams. ARGV: 1 group, then per stream (in KEYS order) the number of ids, then ids.
-- Reply: the number of entries acknowledged.

local CHUNK = 500 -- ids per XACK call (unpack has a stack limit)
local acked = 0
local at = 2
for i = 1, #KEYS do
  local n = tonumber(ARGV[at])
  local first = at + 1
  local last = at + n
  while first <= last do
    local upto = math.min(first + CHUNK - 1, last)
    acked = acked + redis.call('XACK', KEYS[i], ARGV[1], unpack(ARGV, first, upto))
    first = upto + 1
  end
  at = last + 1
end
return acked
