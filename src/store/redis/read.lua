-- Reads a topic's bounds and events from a number on (see READ in redis.rs).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {} end
local state = redis.call('HMGET', KEYS[1], 'seq', 'pub')
local last = tonumber(state[1] or '0')
local head = last
-- Events not yet sent live (waiting for replicas to confirm them, see
-- publish.lua) are not read either.
local sent = tonumber(state[2] or '')
if sent and sent < head then head = sent end
-- Nothing sent yet: to readers the topic has no history, as before its
-- first publish (its epoch comes with its first event).
if head == 0 then return {} end
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[3])
local oldest = head + 1
local kept = first_kept(KEYS[2], cutoff)
if kept then
  oldest = math.min(tonumber(string.match(kept[1], '^(%d+)')), head + 1)
end
-- Retention by count: the stream may hold a few events more than it keeps
-- (publish.lua trims single events a few at a time), hidden here.
local counted = last - tonumber(ARGV[4]) + 1
if oldest < counted then
  oldest = math.min(counted, head + 1)
end
local result = {epoch, head, oldest}
local limit = tonumber(ARGV[2])
if limit > 0 then
  local from = math.max(tonumber(ARGV[1]), oldest)
  local entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', from),
    string.format('%d-0', head), 'COUNT', limit)
  for _, entry in ipairs(entries) do
    table.insert(result, string.match(entry[1], '^(%d+)'))
    table.insert(result, entry[2][4])
    table.insert(result, entry[2][6])
  end
end
return result
