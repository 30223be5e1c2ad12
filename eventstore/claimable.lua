-- flowlog: entries of a consumer group idle for at least min_idle ms, over the stream it reads
-- in every partition (the feed, or a queue's work stream), in one call (instead of one
-- XPENDING per partition from the client on every fetch).
--
-- KEYS: the group's stream in each partition, in partition order.
-- ARGV: 1 group, 2 min idle ms, 3 at most this many entries.
-- Reply: flat list of (partition, entry id) pairs, partition order, oldest first per stream.

local out = {}
local room = tonumber(ARGV[3])
for i = 1, #KEYS do
  if room <= 0 then
    break
  end
  local rows = redis.pcall('XPENDING', KEYS[i], ARGV[1], 'IDLE', ARGV[2], '-', '+', room)
  if type(rows) == 'table' and not rows.err then
    for _, row in ipairs(rows) do
      out[#out + 1] = i - 1
      out[#out + 1] = row[1]
      room = room - 1
    end
  end
end
return out
