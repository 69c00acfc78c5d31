-- owner_release: a session ended or a node left this instance: drop its owner key, but only
-- if it still names this instance (another may have taken it over meanwhile).
--
-- Reply: 1 if deleted, 0 otherwise.
--
-- KEYS[1] scheduler:owner:session:{session_id} or scheduler:owner:node:{node_id}
local owner_key = KEYS[1]
-- ARGV[1] instance id
local instance = ARGV[1]

if redis.call('GET', owner_key) == instance then
  return redis.call('DEL', owner_key)
end
return 0
