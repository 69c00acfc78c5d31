-- owner_claim: record (or keep alive) an instance as the owner of a session or a node.
--
-- The owner key names the instance holding the socket; it lives owner_ttl_ms unless the
-- owner refreshes it. A refresh (force = 0) only extends the key while it still names this
-- instance; a fresh claim (force = 1: a client or node just connected here) takes the key
-- over, since the socket is here now, whoever held it before.
--
-- Reply: {"OK", previous owner or ""} or, for a refresh of a key another instance holds,
-- {"LOST", current owner} (nothing changed).
--
-- KEYS[1] scheduler:owner:session:{session_id} or scheduler:owner:node:{node_id}
local owner_key = KEYS[1]
-- ARGV[1] instance id, ARGV[2] owner_ttl_ms, ARGV[3] force ("1" or "0")
local instance = ARGV[1]
local ttl_ms = tonumber(ARGV[2])
local force = ARGV[3] == '1'

local current = redis.call('GET', owner_key)
if current and current ~= instance and not force then
  return {'LOST', current}
end
redis.call('SET', owner_key, instance, 'PX', ttl_ms)
return {'OK', current or ''}
