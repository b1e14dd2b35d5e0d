-- first_kept(key, cutoff): the first entry of stream `key` stored at or
-- after `cutoff` (ms), and whether an older entry comes before it; nil when
-- there is none. The first entry is looked at alone before pages are read:
-- publishing trims what expired, so it is almost always the one.
-- Prepended to the scripts that need it.
local function first_kept(key, cutoff)
  local start = '-'
  local size = 1
  while true do
    local page = redis.call('XRANGE', key, start, '+', 'COUNT', size)
    for i, entry in ipairs(page) do
      if tonumber(entry[2][2]) >= cutoff then
        return entry, start ~= '-' or i > 1
      end
    end
    if #page < size then
      return nil
    end
    start = '(' .. page[#page][1]
    size = 64
  end
end
