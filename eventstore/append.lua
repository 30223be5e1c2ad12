-- flowlog: append batches of events to runs of one partition, each batch atomically.
--
-- KEYS: 1 partition feed, 2 partition run index, 3 partition queue set, then per run:
--       run stream, head, snapshot, the dedup key of each of its n events, then its w work
--       streams.
-- ARGV: 1 dedup ttl ms, 2 retention ms, 3 terminal statuses (space separated), 4 audit key
--       ('' if none), then per run: run id, expected seq (-1: none), n, w, then 7 values per
--       event: payload digest, envelope bytes (seq 0), new run status ('' if none), sha1 hex of
--       the envelope bytes, sha256 hex of the envelope bytes ('' without an audit key), '1' if
--       the event is passive else '', the event's work stream j ('0': none); then the queue
--       name of each of its work streams.
-- Reply: per run, in order, 4 values per event: outcome (a appended, d duplicate,
--        m mismatch, c conflict), seq (given or original, 0 if none), entry id ('' if none),
--        the run's seq on conflict.
--
-- Run stream entries have the id <seq>-0 (reads after a seq need no scan); feed entries get
-- a time id, which is the entry id reported, kept in the head and in the dedup record.
-- A step_scheduled event also goes to its queue's work stream (s and e, a time id of its
-- own), and the queue joins the partition's queue set.
-- The run index scores a run by the server time of its first append, in ms with us digits.
-- Every read and check of a run's batch happens before its first write: a script cannot roll
-- back. The head's ver is the seq of the run's last non-passive event: an expected seq is met
-- when ver <= expected <= seq (only passive events came after it).
-- Several runs share one call (one script run per partition, not per run): the per-call cost
-- of a script is most of the cost of a small batch.
--
-- Run stream entries carry s (seq), e (envelope), h = sha1hex(prev h "\n" s "\n" sha1hex(e))
-- and, with an audit key, m = hmac_sha256_hex(key, prev m "\n" s "\n" sha256hex(e)); the head
-- keeps the last h and m. The digests of e come from the caller, which hashes e anyway (the
-- server hashes a short string per event, not the whole envelope); a wrong digest is
-- caught by the audit, which recomputes them from e. Feed entries carry s and e only.
-- hmac_key and hmac_hex come from sha256.lua, included in front of this script only when the
-- store has an audit key (without one they are never called).

local call = redis.call
local WIDTH = 7 -- ARGV per event
local MGET_CHUNK = 500 -- keys per MGET call (unpack has a stack limit)
local FEED, RUNS, QUEUES = KEYS[1], KEYS[2], KEYS[3]
local dedup_ttl = ARGV[1]
local retention = ARGV[2]
local terminal_statuses = ARGV[3]
local audit_key = ARGV[4] ~= '' and hmac_key(ARGV[4]) or nil
local reply = {}

-- Appends the batch of one run. k: index of its run stream key, a: index of its run id
-- argument. Returns the indices of the next run's first key and argument.
local function append_run(k, a)
  local run_key, head_key, snap_key = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local run_id = ARGV[a]
  local expected = tonumber(ARGV[a + 1])
  local n = tonumber(ARGV[a + 2])
  local works = tonumber(ARGV[a + 3])
  local first_key = k + 2 -- KEYS[first_key + i]: dedup key of event i
  local first_arg = a + 3 -- ARGV[first_arg + (i - 1) * WIDTH + f]: field f of event i
  local work_key = first_key + n -- KEYS[work_key + j]: work stream j
  local queue_arg = first_arg + n * WIDTH -- ARGV[queue_arg + j]: queue of work stream j
  local used = {} -- work stream j -> true once an entry went to it

  local head = call('HMGET', head_key, 'seq', 'hash', 'status', 'mac', 'ver')
  local seq = tonumber(head[1]) or 0
  local prev_hash = head[2] or ''
  local status = head[3] or ''
  local first_status = status
  local prev_mac = head[4] or ''
  local ver = tonumber(head[5]) or seq

  -- Validation: classify every event without writing anything.
  local code, given, entry = {}, {}, {}
  local first_index = {} -- dedup key -> index of its first new occurrence in this batch
  local repeat_of = {} -- index -> index of the earlier new event with the same id
  local fresh = 0
  local records = {} -- the dedup records, fetched MGET_CHUNK keys per call
  for first = 1, n, MGET_CHUNK do
    local last = math.min(first + MGET_CHUNK - 1, n)
    local found = call('MGET', unpack(KEYS, first_key + first, first_key + last))
    for j = first, last do
      records[j] = found[j - first + 1]
    end
  end
  for i = 1, n do
    local dedup_key = KEYS[first_key + i]
    local known = records[i]
    local digest = ARGV[first_arg + (i - 1) * WIDTH + 1]
    if known then
      local known_entry, known_seq, known_digest = string.match(known, '^(%S+) (%d+) (%S+)$')
      code[i] = (known_digest == digest) and 'd' or 'm'
      given[i], entry[i] = tonumber(known_seq), known_entry
    else
      local first = first_index[dedup_key]
      if first then
        repeat_of[i] = first
        local first_digest = ARGV[first_arg + (first - 1) * WIDTH + 1]
        code[i] = (first_digest == digest) and 'd' or 'm'
      else
        first_index[dedup_key] = i
        code[i] = 'n'
        fresh = fresh + 1
      end
    end
  end

  local r = #reply
  -- Expected seq missed: new events (and their repeats with the same payload) conflict.
  if fresh > 0 and expected >= 0 and (expected > seq or expected < ver) then
    for i = 1, n do
      if code[i] == 'n' or repeat_of[i] then
        reply[r + 1] = (code[i] == 'm') and 'm' or 'c'
        reply[r + 2] = 0
        reply[r + 3] = ''
        reply[r + 4] = seq
      else
        reply[r + 1] = code[i]
        reply[r + 2] = given[i]
        reply[r + 3] = entry[i]
        reply[r + 4] = 0
      end
      r = r + 4
    end
    return work_key + works + 1, queue_arg + works + 1
  end

  -- Writes.
  local status_changed = false
  local last_entry = nil
  for i = 1, n do
    local c = code[i]
    if c == 'n' then
      local base = first_arg + (i - 1) * WIDTH
      seq = seq + 1
      local s = tostring(seq)
      local payload = ARGV[base + 2]
      local h = redis.sha1hex(prev_hash .. '\n' .. s .. '\n' .. ARGV[base + 4])
      if audit_key then
        prev_mac = hmac_hex(audit_key, prev_mac .. '\n' .. s .. '\n' .. ARGV[base + 5])
        call('XADD', run_key, s .. '-0', 's', s, 'e', payload, 'h', h, 'm', prev_mac)
      else
        call('XADD', run_key, s .. '-0', 's', s, 'e', payload, 'h', h)
      end
      local id = call('XADD', FEED, '*', 's', s, 'e', payload)
      local work = tonumber(ARGV[base + 7])
      if work > 0 then
        call('XADD', KEYS[work_key + work], '*', 's', s, 'e', payload)
        used[work] = true
      end
      -- The record is known to be absent (checked above, in this same atomic script).
      call('SET', KEYS[first_key + i], id .. ' ' .. s .. ' ' .. ARGV[base + 1], 'PX', dedup_ttl)
      if seq == 1 then
        local now = call('TIME')
        call('ZADD', RUNS, now[1] * 1000 + now[2] / 1000, run_id)
      end
      if ARGV[base + 6] == '' then
        ver = seq
      end
      local new_status = ARGV[base + 3]
      if new_status ~= '' then
        status = new_status
        status_changed = true
      end
      prev_hash = h
      last_entry = id
      given[i], entry[i] = seq, id
      reply[r + 1] = 'a'
    else
      local first = repeat_of[i]
      if first then
        given[i], entry[i] = given[first], entry[first]
      end
      reply[r + 1] = c
    end
    reply[r + 2] = given[i]
    reply[r + 3] = entry[i]
    reply[r + 4] = 0
    r = r + 4
  end

  for work in pairs(used) do
    call('SADD', QUEUES, ARGV[queue_arg + work])
  end

  if last_entry then
    call('HSET', head_key, 'seq', seq, 'entry', last_entry, 'hash', prev_hash, 'status', status,
      'ver', ver)
    if audit_key then
      call('HSET', head_key, 'mac', prev_mac)
    end
    if status_changed then
      local terminal, was_terminal = false, false
      for word in string.gmatch(terminal_statuses, '%S+') do
        terminal = terminal or word == status
        was_terminal = was_terminal or word == first_status
      end
      -- Only a terminal status sets a TTL: keys of a run that was not finished have none.
      for _, key in ipairs({ run_key, head_key, snap_key }) do
        if terminal then
          call('PEXPIRE', key, retention)
        elseif was_terminal then
          call('PERSIST', key)
        end
      end
    end
  end
  return work_key + works + 1, queue_arg + works + 1
end

local k, a = 4, 5
while a <= #ARGV do
  k, a = append_run(k, a)
end
return reply
