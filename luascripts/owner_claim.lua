-- owner_claim: record an instance as the owner of a session or a node (its socket is here now,
-- whoever held it before). The record has no TTL: it is valid while the instance it names is
-- alive ({scheduler}:instances), dropped by owner_release when the socket leaves, and
-- collected with the rest of a dead instance's records (scheduler/cluster/ownership.py).
--
-- Reply: the previous owner, or "" if none.
--
-- KEYS[1] scheduler:owner:session:{session_id} or scheduler:owner:node:{node_id}
local owner_key = KEYS[1]
-- ARGV[1] instance id
local previous = redis.call('GET', owner_key)
redis.call('SET', owner_key, ARGV[1])
return previous or ''
