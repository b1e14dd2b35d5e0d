-- Gives a topic a new epoch if it still has ARGV[1] (see REEPOCH in redis.rs).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and epoch == ARGV[1] then
  epoch = fresh_epoch(epoch)
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
return epoch
