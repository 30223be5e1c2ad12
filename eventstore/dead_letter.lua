-- flowlog: move one feed (or work stream) entry to the dead-letter stream and acknowledge it,
-- atomically.
--
-- KEYS: 1 partition feed or work stream, 2 partition dead-letter stream.
-- ARGV: 1 group, 2 entry id, 3 reason, 4 deliveries, 5 raw entry bytes.
-- Reply: the dead-letter entry id.

local id = redis.call('XADD', KEYS[2], '*', 'group', ARGV[1], 'entry', ARGV[2],
  'reason', ARGV[3], 'deliveries', ARGV[4], 'raw', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return id
