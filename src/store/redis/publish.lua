-- Numbers, appends, trims and publishes the events of one or more
-- requests, each for one topic, and keeps their idempotency records (see
-- PUBLISH in redis.rs for KEYS and ARGV).
--
-- The common publish (one event, no key, nothing expired) costs TIME,
-- HMGET, INFO replication, XADD, PUBLISH and HSET: the meta hash remembers
-- when the oldest retained event expires at the earliest, so the stream is
-- only read when something may have expired.
--
-- When publishes wait for replicas (ARGV[8] is 1), events are not sent
-- live here: CONFIRM sends them once WAIT has confirmed them, and the meta
-- hash's `pub` says how far that got (readers see no further), so no
-- client ever holds an event a failover could lose.

-- Single events trim the stream by count once every so many (see below).
local TRIM_EVERY = 16

-- TIME and INFO replication, read once per call whatever its requests.
-- The time in ms, also as text: a number handed to redis.call is
-- formatted on every call.
local now_ms, now_text, info
local function clock_ms()
  if not now_ms then
    local time = redis.call('TIME')
    now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    now_text = string.format('%d', now_ms)
  end
  return now_ms, now_text
end
local function replication()
  info = info or redis.call('INFO', 'replication')
  return info
end
-- A field of INFO replication (a 40-digit id), found by plain search: a
-- Lua pattern would cost microseconds over the whole text.
local function replication_field(name)
  local text = replication()
  local at = string.find(text, '\n' .. name .. ':', 1, true)
  return at and string.sub(text, at + #name + 2, at + #name + 41)
end
-- The replication history's id (see below), found once per call.
local current_line
local function line_now()
  current_line = current_line or replication_field('master_replid')
  return current_line
end

-- One request: its keys are KEYS[k + 1] on, its na arguments ARGV[a + 1]
-- on. Offsets, not copies: the common publish is paid mostly in Lua, by
-- the tables and strings it makes, and in its redis.calls.
local function publish(k, a, na)
  local waits = ARGV[a + 8] == '1'
  local nkeys = tonumber(ARGV[a + 11])
  local guard = a + 11 + nkeys + 1
  local nguard = tonumber(ARGV[guard])
  for g = 1, nguard do
    local meta = KEYS[k + 2 + nkeys + 2 * g - 1]
    local meta_type = redis.call('TYPE', meta)['ok']
    local events_type = redis.call('TYPE', KEYS[k + 2 + nkeys + 2 * g])['ok']
    -- Without a meta hash the topic starts afresh (its events key is
    -- deleted), so only a topic that has one is checked further.
    local ok = meta_type == 'none' or meta_type == 'hash'
    if ok and meta_type == 'hash' then
      ok = events_type == 'none' or events_type == 'stream'
    end
    if ok and meta_type == 'hash' then
      local n = tonumber(redis.call('HGET', meta, 'seq') or '0')
      ok = n and n >= 0 and n % 1 == 0 and n + tonumber(ARGV[guard + g]) <= 9007199254740991
    end
    if not ok then
      return redis.error_reply('ERR crier: the number of ' .. meta .. ' is corrupt or would pass 2^53 - 1')
    end
  end
  local meta_key, events_key = KEYS[k + 1], KEYS[k + 2]
  local records = {}
  for r = 1, nkeys do
    local record = redis.call('GET', KEYS[k + 2 + r])
    if record and string.sub(record, 1, 64) ~= ARGV[a + 11 + r] then
      return {'reused', r}
    end
    records[r] = record
  end
  local base = guard + nguard
  local count = (a + na - base) / 3
  local fresh = count
  if nkeys > 0 then
    fresh = 0
    local claimed = {}
    for i = 0, count - 1 do
      local r = tonumber(ARGV[base + 3 * i + 1])
      if r == 0 then
        fresh = fresh + 1
      elseif not records[r] and not claimed[r] then
        claimed[r] = true
        fresh = fresh + 1
      end
    end
  end
  -- The epoch, the first number, why the epoch was renewed (0: it was
  -- not; 1: another replication history; 2: a node saw the topic further
  -- along), the topic's last number afterwards, then an outcome per event.
  local out = {'0', 1, 0, 0}
  if fresh == 0 then
    if waits then
      -- A write of its own, so the WAIT after it covers every event numbered
      -- so far (WAIT waits for this client's last write), the replayed ones
      -- included: CONFIRM may then send them up to the head.
      local head = redis.call('HGET', meta_key, 'seq')
      if head then
        redis.call('HSET', meta_key, 'seq', head)
        out[4] = tonumber(head) or 0
      end
    end
    for i = 0, count - 1 do
      out[5 + i] = string.sub(records[tonumber(ARGV[base + 3 * i + 1])], 66)
    end
    return out
  end
  local now_ms, now_text = clock_ms()
  local max_age = tonumber(ARGV[a + 3])
  local meta = redis.call('HMGET', meta_key, 'epoch', 'seq', 'expires', 'line', 'renew', 'pub')
  local epoch = meta[1]
  local seq = 0
  -- The replication history this primary's data belongs to. It changes when
  -- the server restarts (from whatever snapshot) and when a replica is
  -- promoted: the topic's last acknowledged events may not have survived,
  -- so its numbering cannot be trusted to go on in the same epoch.
  local line = line_now()
  -- When the oldest retained event expires, at the earliest: trimming by
  -- count only ever removes older events, so it stays a lower bound.
  local expires = tonumber(meta[3] or '0') or 0
  local renewed = false
  if not epoch then
    epoch = fresh_epoch(nil)
    redis.call('DEL', events_key)
    expires = 0
    renewed = true
  else
    seq = tonumber(meta[2] or '0')
    if not seq or seq < 0 or seq % 1 ~= 0 or seq + fresh > 9007199254740991 then
      return redis.error_reply('ERR crier: the number of ' .. meta_key .. ' is corrupt or would pass 2^53 - 1')
    end
    if ARGV[a + 5] == epoch and seq < tonumber(ARGV[a + 6]) then
      epoch = fresh_epoch(epoch)
      out[3] = 2
      renewed = true
    elseif meta[4] and meta[4] ~= line
        and not (waits and meta[4] == replication_field('master_replid2')) then
      -- Another history than the one the topic was last written in: a
      -- restart or a failover. Only a failover from that very primary,
      -- with every publish confirmed by replicas (--redis-wait-replicas),
      -- is known to have kept every acknowledged event. (A meta without a
      -- line was written before crier kept one: it is adopted.)
      epoch = fresh_epoch(epoch)
      out[3] = 1
      renewed = true
    end
  end
  out[1] = epoch
  out[2] = seq + 1
  -- Trimmed by count once, with the last event: a batch's appends before it
  -- do not trim one entry each.
  local left = fresh
  local channel, live_head = ARGV[a + 1], ARGV[a + 10]
  local number
  for i = 0, count - 1 do
    local at = base + 3 * i
    local r = tonumber(ARGV[at + 1])
    if r > 0 and records[r] then
      out[5 + i] = string.sub(records[r], 66)
    else
      seq = seq + 1
      left = left - 1
      number = string.format('%d', seq)
      local name, data = ARGV[at + 2], ARGV[at + 3]
      -- The stream is trimmed by count exactly after a request of several
      -- events, and after a single one only every TRIM_EVERY events: one
      -- trim of several entries costs Redis what a trim of one does.
      -- Readers hide what is kept beyond the count (read.lua).
      if left == 0 and (count > 1 or seq % TRIM_EVERY == 0) then
        redis.call('XADD', events_key, 'MAXLEN', ARGV[a + 2], number .. '-0', 't', now_text, 'e', name, 'd', data)
      else
        redis.call('XADD', events_key, number .. '-0', 't', now_text, 'e', name, 'd', data)
      end
      -- PUBLISH, or SPUBLISH on a cluster, whose channel (one per
      -- partition) shares the keys' slot and whose messages name their topic.
      if not waits then
        redis.call(ARGV[a + 9], channel, live_head .. number .. ' ' .. epoch .. '\n' .. name .. '\n' .. data)
      end
      if r > 0 then
        records[r] = ARGV[a + 11 + r] .. ' ' .. number .. ' ' .. epoch
        redis.call('SET', KEYS[k + 2 + r], records[r], 'PX', ARGV[a + 7])
      end
      out[5 + i] = ''
    end
  end
  out[4] = seq
  -- Only what changed: the number always; the epoch when renewed.
  local fields = {'seq', number or string.format('%d', seq)}
  if renewed then
    fields[#fields + 1] = 'epoch'
    fields[#fields + 1] = epoch
  end
  -- How far the topic's events were sent live: all of them, unless they
  -- wait for CONFIRM (a topic first published so, or never before, from
  -- where it stood). Readers take a missing `pub` for all of them, so a
  -- topic never published while waiting has none to keep up.
  if not waits then
    if meta[6] then
      fields[#fields + 1] = 'pub'
      fields[#fields + 1] = fields[2]
    end
  elseif not meta[6] then
    fields[#fields + 1] = 'pub'
    fields[#fields + 1] = string.format('%d', out[2] - 1)
  end
  if meta[4] ~= line then
    fields[#fields + 1] = 'line'
    fields[#fields + 1] = line
  end
  if now_ms >= expires then
    -- Something may have expired: drop what has, a page at a time, and
    -- note when the oldest event left expires. The events just appended
    -- are not expired (max age >= 1 ms), so one is always found.
    local kept, older = first_kept(events_key, now_ms - max_age)
    expires = 0
    if kept then
      if older then
        redis.call('XTRIM', events_key, 'MINID', kept[1])
      end
      expires = tonumber(kept[2][2]) + max_age
    end
    fields[#fields + 1] = 'expires'
    fields[#fields + 1] = string.format('%d', expires)
  end
  -- The keys' lifetimes are stretched by half again only every half of the
  -- shorter one, not on every publish: a key then lives at least as long as
  -- its newest event is retained (events past their age are trimmed and
  -- never read), and at most half as long again.
  local renew = tonumber(meta[5] or '0') or 0
  if now_ms >= renew then
    local meta_ttl = tonumber(ARGV[a + 4])
    redis.call('PEXPIRE', events_key, max_age + math.floor(max_age / 2))
    redis.call('PEXPIRE', meta_key, meta_ttl + math.floor(meta_ttl / 2))
    fields[#fields + 1] = 'renew'
    fields[#fields + 1] = string.format('%d', now_ms + math.floor(math.min(max_age, meta_ttl) / 2))
  end
  redis.call('HSET', meta_key, unpack(fields))
  return out
end

-- ARGV[1] requests, then each one's number of keys and of arguments; each
-- request's answer, or its error alone (a failed command ends that request,
-- not the ones after it).
local requests = tonumber(ARGV[1])
local k, a = 0, 1 + 2 * requests
local answers = {}
for r = 1, requests do
  local nk, na = tonumber(ARGV[2 * r]), tonumber(ARGV[2 * r + 1])
  local ok, answer = pcall(publish, k, a, na)
  if ok then
    answers[r] = answer
  elseif type(answer) == 'table' and answer.err then
    answers[r] = answer
  else
    answers[r] = redis.error_reply(tostring(answer))
  end
  k, a = k + nk, a + na
end
return answers
