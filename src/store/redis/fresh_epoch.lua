-- fresh_epoch(old): an epoch from the clock (base-36 ids of at most 7
-- digits), never equal to old. Prepended to the scripts that need it.
local function fresh_epoch(old)
  local now = redis.call('TIME')
  local epoch = (tonumber(now[1]) * 1000000 + tonumber(now[2])) % 78364164096
  if old and string.format('%d', epoch) == old then epoch = (epoch + 1) % 78364164096 end
  return string.format('%d', epoch)
end
