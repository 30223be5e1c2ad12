-- flowlog: hand pending entries (of a feed or a work stream) to a consumer again (own pending
-- after a restart, or entries idle long enough to be claimed), dead-lettering those delivered
-- too often.
--
-- KEYS: 1 partition feed or work stream, 2 partition dead-letter stream.
-- ARGV: 1 group, 2 consumer, 3 min idle ms, 4 max deliveries, 5 '1': only entries this
--       consumer owns ('0': any owner), 6 dead-letter reason prefix, 7.. entry ids.
-- Reply: 3 values per entry handed out: entry id, this delivery's number, entry fields.
--
-- Each entry is re-checked here (still pending, owner, idle time), so two consumers racing
-- for one entry cannot both take it.

local group, consumer = ARGV[1], ARGV[2]
local min_idle, max_deliveries = tonumber(ARGV[3]), tonumber(ARGV[4])
local own_only = ARGV[5] == '1'
local reply = {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local pending = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1]
  if pending and (not own_only or pending[2] == consumer) and pending[3] >= min_idle then
    local deliveries = pending[4]
    if deliveries >= max_deliveries then
      local found = redis.call('XRANGE', KEYS[1], id, id)[1]
      local raw = ''
      if found then
        local fields = found[2]
        for j = 1, #fields, 2 do
          if fields[j] == 'e' then
            raw = fields[j + 1]
          end
        end
      end
      local reason = ARGV[6] .. ': delivered ' .. deliveries .. ' times (max_deliveries is '
        .. max_deliveries .. ')'
      redis.call('XADD', KEYS[2], '*', 'group', group, 'entry', id, 'reason', reason,
        'deliveries', deliveries, 'raw', raw)
      redis.call('XACK', KEYS[1], group, id)
    else
      local claimed = redis.call('XCLAIM', KEYS[1], group, consumer, 0, id)[1]
      if claimed then
        reply[#reply + 1] = id
        reply[#reply + 1] = deliveries + 1
        reply[#reply + 1] = claimed[2]
      end
    end
  end
end
return reply
