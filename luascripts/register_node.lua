-- register_node: write a node's info, reset its runtime, join its pools, index pools by lang pair.
-- The runtime table ({scheduler}:nodes:runtime, one hash per shard for all its nodes) holds
-- each node's current_jobs (field `<node_id>:current_jobs`) and a copy of the info fields node
-- choice reads (field `<node_id>`: online, draining, saturated, max_jobs, last_heartbeat_ts,
-- load_score, conn_id and owner packed, lib/runtime_table.lua), so that node choice reads
-- every candidate with one HMGET (lib/choose_node.lua); every script that writes one of them
-- in the info writes the copy too (heartbeats, node_state). Node ids hold no ':'
-- (protocol.py, ID_PATTERN). A node gone for good leaves its two fields behind, as it leaves
-- its id in {scheduler}:nodes: bounded by the node ids ever seen; the table's TTL is
-- refreshed by every registration and heartbeat.
--
-- Contract: after this script the node is online, its current_jobs equals the jobs it still
-- holds (its job set), it is a member of every pool it serves, and every (src, tgt) pair it
-- serves lists those pools. Re-registering the same node id overwrites its info.
-- A new connection (conn_id differs from the stored one: the node reconnected) holds no job:
-- the jobs of the old connection died with its socket, so its job set is emptied and their
-- slots are free at once. Whoever placed them moves them (dispatcher.py: the placement's
-- conn_id no longer matches); the leases of jobs whose placing instance is dead stay for the
-- orphan sweep, which cancels them. The same connection registering again (Redis lost the
-- node) keeps the jobs it holds.
-- Pools: the info hash keeps the pools the node serves ('pools', a JSON list). A node that
-- registers again serving fewer pools (restarted with another configuration) leaves the
-- ones it no longer serves, so it gets no job of a pair it does not serve. The caller reads
-- 'pools' first and declares those pools' member sets (KEYS[5+2n...]); if the stored list
-- names a pool not declared (it changed meanwhile), nothing changes: STALE_CANDIDATES, and
-- the caller reads again.
-- Reply: {"OK"}. Errors: STALE_CANDIDATES (the caller validates the rest of its input).
--
-- KEYS[1]            {scheduler}:node:info:<node_id>      hash
-- KEYS[2]            {scheduler}:nodes:runtime            hash, the runtime table
-- KEYS[3]            {scheduler}:node:jobs:<node_id>      set of job ids held
-- KEYS[4]            {scheduler}:nodes                    set of node ids
-- KEYS[4+i]          {scheduler}:pool:<pool_i>:members    set,  i = 1..n
-- KEYS[4+n+i]        {scheduler}:lang:<src_i>:<tgt_i>     hash, i = 1..n (pool -> "1")
-- KEYS[4+2n+j]       {scheduler}:pool:<old_j>:members     set,  j = 1..m: the pools stored before
local info_key = KEYS[1]
-- @include runtime_table
local runtime_key = KEYS[2]
local jobs_key = KEYS[3]
local nodes_key = KEYS[4]
-- ARGV[1] node_id, ARGV[2] cap_json, ARGV[3] max_jobs, ARGV[4] now_ms, ARGV[5] owner instance id,
-- ARGV[6] n (entries), ARGV[6+i] pool name of entry i, ARGV[7+n] key TTL (s) of the node's keys,
-- refreshed by every heartbeat (a node gone for good leaves nothing behind), ARGV[8+n] conn_id:
-- the id of the node's connection (a new one per socket; the same when a connection registers
-- again because Redis forgot it). dispatch_task returns it with each placement, so that the
-- placing instance can tell that the connection which got a job is gone (dispatcher.py).
-- ARGV[9+n] m, ARGV[9+n+j] the name of old pool j (as the caller read them),
-- ARGV[10+n+m] the language pairs served, a JSON list of [src, tgt] (shown by /cluster).
local node_id = ARGV[1]
local cap_json = ARGV[2]
local max_jobs = tonumber(ARGV[3])
local now_ms = ARGV[4]
local owner = ARGV[5]
local n = tonumber(ARGV[6])
local node_ttl_s = tonumber(ARGV[7 + n])
local conn_id = ARGV[8 + n] or ''
local m = tonumber(ARGV[9 + n] or '0')
local pairs_json = ARGV[10 + n + m] or '[]'

local serves, names = {}, {}
for i = 1, n do
  local pool = ARGV[6 + i]
  if not serves[pool] then
    serves[pool] = true
    names[#names + 1] = pool
  end
end
local declared_old = {}
for j = 1, m do
  declared_old[ARGV[9 + n + j]] = KEYS[4 + 2 * n + j]
end
local leave = {}
local stored = redis.call('HGET', info_key, 'pools')
if stored then
  for _, pool in ipairs(cjson.decode(stored)) do
    if not serves[pool] then
      if not declared_old[pool] then
        return redis.error_reply('STALE_CANDIDATES pools of ' .. node_id .. ' changed since read')
      end
      leave[#leave + 1] = declared_old[pool]
    end
  end
end
-- whether the pool tables change (a pool's members, a pair's pools): then the runtime table
-- gets a new version of them ('#pools', read with the candidates by node choice:
-- lib/choose_node.lua): "<n>/<time>/<node>/<connection>", n one more than the last one's, so
-- that a caller's list read before it is never taken for current, not even after the table
-- expired and was made again (a table without a version gets one at the first registration)
local pools_version = redis.call('HGET', runtime_key, '#pools')
local pools_changed = not pools_version
for _, members_key in ipairs(leave) do
  pools_changed = redis.call('SREM', members_key, node_id) == 1 or pools_changed
end
for i = 1, n do
  local pool = ARGV[6 + i]
  pools_changed = redis.call('SADD', KEYS[4 + i], node_id) == 1 or pools_changed
  pools_changed = redis.call('HSET', KEYS[4 + n + i], pool, '1') == 1 or pools_changed
end

local previous_conn = redis.call('HGET', info_key, 'conn_id')
if previous_conn and previous_conn ~= conn_id then
  redis.call('DEL', jobs_key)
end
redis.call('HSET', info_key,
  'node_id', node_id, 'online', '1', 'draining', '0', 'cap_json', cap_json,
  'max_jobs', max_jobs, 'last_heartbeat_ts', now_ms, 'registered_ts', now_ms,
  'load_json', '{}', 'load_score', '', 'saturated', '0', 'owner', owner, 'conn_id', conn_id, 'pools', cjson.encode(names),
  'lang_pairs', pairs_json)
-- the runtime table: the slot count, and the copy of the info fields choose_node reads (one
-- HMGET for every candidate: lib/choose_node.lua), written wherever the info's are
local fields = {node_id .. ':current_jobs', redis.call('SCARD', jobs_key),
  node_id, runtime_copy({'1', '0', '0', max_jobs, now_ms, '', conn_id, owner}),
  RUNTIME_TABLE_MARK[1], RUNTIME_TABLE_MARK[2]}
if pools_changed then
  fields[#fields + 1] = '#pools'
  local n_before = tonumber((pools_version or ''):match('^(%d+)/') or '0')
  fields[#fields + 1] = (n_before + 1) .. '/' .. now_ms .. '/' .. node_id .. '/' .. conn_id
end
redis.call('HSET', runtime_key, unpack(fields))
redis.call('SADD', nodes_key, node_id)
redis.call('EXPIRE', info_key, node_ttl_s)
redis.call('EXPIRE', runtime_key, node_ttl_s)
return {'OK'}
