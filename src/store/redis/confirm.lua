-- Sends live, in order, each topic's events numbered up to what replicas
-- confirmed, and notes how far each topic is sent (see CONFIRM in redis.rs).
for t = 1, #KEYS / 2 do
  local meta = KEYS[2 * t - 1]
  local a = 1 + 3 * (t - 1)
  local state = redis.call('HMGET', meta, 'epoch', 'seq', 'pub')
  local epoch = state[1]
  local sent = tonumber(state[3] or '')
  local through = math.min(tonumber(ARGV[a + 3]), tonumber(state[2] or '0') or 0)
  if epoch and sent and through > sent then
    local entries = redis.call('XRANGE', KEYS[2 * t], string.format('%d-0', sent + 1),
      string.format('%d-0', through))
    for _, entry in ipairs(entries) do
      local seq = string.match(entry[1], '^(%d+)')
      redis.call(ARGV[1], ARGV[a + 1],
        ARGV[a + 2] .. seq .. ' ' .. epoch .. '\n' .. entry[2][4] .. '\n' .. entry[2][6])
    end
    redis.call('HSET', meta, 'pub', string.format('%d', through))
  end
end
return 1
