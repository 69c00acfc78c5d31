-- heartbeat: mark a registered node alive, stamp the time, store its load, its load score and
-- whether that score is above the holding instance's --node-load-threshold (choose_node skips a
-- saturated node). A draining node's heartbeat says so again (ARGV[6] = '1'), so that a drain
-- whose node_state call failed (Redis out) or was forgotten (Redis lost its data and the node
-- was registered again) reaches Redis with the next heartbeat; only on the node's current
-- connection (ARGV[7]), and never back to '0' (a node's drain lasts as long as its connection).
--
-- A heartbeat that came on another connection than the node's current one changes nothing
-- ({"STALE_CONN", current conn_id}): the node reconnected since (the old socket's load is not
-- the node's), or that connection closed (node_state cleared it: a heartbeat handled late,
-- after the close, must not bring the node back online). A node marked offline on its
-- current connection by another instance (it took this one for dead) is online again.
--
-- Reply: {"OK", current_jobs} or {"STALE_CONN", conn_id}. Errors: UNKNOWN_NODE (never
-- registered, or its info expired). heartbeats.lua does the same for several nodes in one call
-- (the daemon's node gateway batches its nodes' heartbeats); both run lib/beat.lua.
--
-- KEYS[1] {scheduler}:node:info:<node_id>     hash
-- KEYS[2] {scheduler}:node:runtime:<node_id>  hash
local info_key = KEYS[1]
local runtime_key = KEYS[2]
-- ARGV[1] now_ms, ARGV[2] load_json, ARGV[3] key TTL (s) of the node's keys (refreshed here),
-- ARGV[4] load score 0-1 ('' when the node sent none), ARGV[5] saturated '1' / '0',
-- ARGV[6] draining '1' / '' (nothing to say), ARGV[7] the connection the heartbeat came on ('' any)
local now_ms = ARGV[1]
local load_json = ARGV[2]
local key_ttl_s = tonumber(ARGV[3])
local load_score = ARGV[4] or ''
local saturated = ARGV[5] or '0'
local draining = ARGV[6] or ''
local conn_id = ARGV[7] or ''

-- @include beat

local reply = beat(info_key, runtime_key, now_ms, load_json, key_ttl_s, load_score, saturated, draining, conn_id)
if not reply then
  return redis.error_reply('UNKNOWN_NODE node is not registered')
end
return reply
