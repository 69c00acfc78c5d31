-- heartbeats: mark registered nodes alive, stamp the time, store each one's load, its load
-- score and whether that score is above the holding instance's --node-load-threshold
-- (choose_node skips a saturated node); several nodes of one shard in one call: the daemon's
-- node gateway writes the heartbeats that arrive within a quarter of the heartbeat interval
-- together, one call per node shard (docs/redis.md, "Heartbeats, batched"). All keys of a call
-- are in one slot (layout 1: the one tag; layout 2: the nodes of one shard).
--
-- Per node: a draining node's heartbeat says so again (draining '1'), so that a drain whose
-- node_state call failed (Redis out) or was forgotten (Redis lost its data and the node was
-- registered again) reaches Redis with the next heartbeat; only on the node's current
-- connection, and never back to '0' (a node's drain lasts as long as its connection). A
-- heartbeat that came on another connection than the node's current one changes nothing
-- ({"STALE_CONN", current conn_id}): the node reconnected since (the old socket's load is not
-- the node's), or that connection closed (node_state cleared it: a heartbeat handled late,
-- after the close, must not bring the node back online). A node marked offline on its
-- current connection by another instance (it took this one for dead) is online again. The
-- runtime table gets the same fields as the info: the copy node choice reads (register_node.lua).
--
-- Reply: one entry per node, in order: {"OK", current_jobs}, {"STALE_CONN", conn_id} or
-- {"UNKNOWN_NODE"} (never registered, or its info expired: the caller registers it again).
--
-- KEYS[1]    {scheduler}:nodes:runtime          hash, the runtime table of the nodes' shard
-- KEYS[1+i]  {scheduler}:node:info:<node_i>     hash, i = 1..n
-- ARGV[1] now_ms, ARGV[2] key TTL (s) of the nodes' keys (refreshed here), then 6 per node:
-- node_id, load_json, load score 0-1 ('' when the node sent none), saturated '1' / '0',
-- draining '1' / '' (nothing to say), the connection the heartbeat came on ('' any)
-- (every key of the call is in the first one's slot)
local runtime_key = KEYS[1]
-- @include runtime_table
local now_ms = ARGV[1]
local key_ttl_s = tonumber(ARGV[2])

-- one node's heartbeat: its reply entry
local function beat(info_key, node_id, load_json, load_score, saturated, draining, conn_id)
  local info = redis.call('HMGET', info_key, unpack(RUNTIME_COPY_FIELDS))
  if not info[4] then  -- (no max_jobs: never registered, or expired)
    return {'UNKNOWN_NODE'}
  end
  local current_conn = info[7] or ''
  if conn_id ~= '' and current_conn ~= conn_id then
    return {'STALE_CONN', current_conn}
  end
  local fields = {'online', '1', 'last_heartbeat_ts', now_ms, 'load_score', load_score, 'saturated', saturated}
  info[1], info[5], info[6], info[3] = '1', now_ms, load_score, saturated
  if draining == '1' then
    fields[#fields + 1] = 'draining'
    fields[#fields + 1] = '1'
    info[2] = '1'
  end
  -- the copy node choice reads (register_node.lua), and the mark (the table may be made here: it expired)
  redis.call('HSET', runtime_key, node_id, runtime_copy(info), RUNTIME_TABLE_MARK[1], RUNTIME_TABLE_MARK[2])
  fields[#fields + 1] = 'load_json'
  fields[#fields + 1] = load_json
  redis.call('HSET', info_key, unpack(fields))
  redis.call('EXPIRE', info_key, key_ttl_s)
  return {'OK', tonumber(redis.call('HGET', runtime_key, node_id .. ':current_jobs') or '0')}
end

local replies, live = {}, false
for i = 1, #KEYS - 1 do
  local a = 2 + 6 * (i - 1)
  replies[i] = beat(KEYS[1 + i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
  live = live or replies[i][1] == 'OK'
end
if live then  -- one TTL for the table, refreshed once per call
  redis.call('EXPIRE', runtime_key, key_ttl_s)
end
return replies
