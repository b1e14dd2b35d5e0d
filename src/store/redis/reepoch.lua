-- Gives a topic a new epoch if it still has ARGV[1] (see REEPOCH in redis.rs),
-- noting the replication history it is renewed in (see publish.lua): from
-- here on the numbering is this history's.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and epoch == ARGV[1] then
  epoch = fresh_epoch(epoch)
  local line = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'line', line)
end
return epoch
