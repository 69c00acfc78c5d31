-- beat (library, inlined where a script says "-- @include beat"): one node's heartbeat, the
-- work of heartbeat.lua (one node) and heartbeats.lua (the nodes an instance holds in one
-- shard, batched); heartbeat.lua says what a heartbeat writes and when it changes nothing.

-- beat(info_key, runtime_key, now_ms, load_json, key_ttl_s, load_score, saturated, draining, conn_id):
-- {"OK", current_jobs}, {"STALE_CONN", current conn_id}, or nil when the node is not
-- registered (UNKNOWN_NODE: never registered, or its info expired).
local function beat(info_key, runtime_key, now_ms, load_json, key_ttl_s, load_score, saturated, draining, conn_id)
  if redis.call('EXISTS', info_key) == 0 then
    return nil
  end
  local current_conn = redis.call('HGET', info_key, 'conn_id') or ''
  if conn_id ~= '' and current_conn ~= conn_id then
    return {'STALE_CONN', current_conn}
  end
  local fields = {'online', '1', 'last_heartbeat_ts', now_ms, 'load_score', load_score, 'saturated', saturated}
  if draining == '1' then
    fields[#fields + 1] = 'draining'
    fields[#fields + 1] = '1'
  end
  redis.call('HSET', runtime_key, unpack(fields))  -- the copy node choice reads (register_node.lua)
  fields[#fields + 1] = 'load_json'
  fields[#fields + 1] = load_json
  redis.call('HSET', info_key, unpack(fields))
  redis.call('EXPIRE', info_key, key_ttl_s)
  redis.call('EXPIRE', runtime_key, key_ttl_s)
  return {'OK', tonumber(redis.call('HGET', runtime_key, 'current_jobs') or '0')}
end
