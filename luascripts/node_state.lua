-- node_state: set a node's online / draining flags, only on behalf of the instance that owns it.
--
-- Used when a node socket closes (online=0) and on a node's `drain` (draining=1), so that a
-- stale instance cannot take a node offline that has since reconnected elsewhere.
-- Reply: {"OK"} or {"NOT_OWNER", current_owner}.
--
-- KEYS[1] {scheduler}:node:info:<node_id>  hash
local info_key = KEYS[1]
-- ARGV[1] owner instance id, ARGV[2] online ("0"/"1"), ARGV[3] draining ("0"/"1")
local owner = ARGV[1]
local online = ARGV[2]
local draining = ARGV[3]

local current = redis.call('HGET', info_key, 'owner')
if current ~= owner then
  return {'NOT_OWNER', current or ''}
end
redis.call('HSET', info_key, 'online', online, 'draining', draining)
return {'OK'}
