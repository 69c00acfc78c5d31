-- heartbeats: the heartbeats of several nodes in one call, each as heartbeat.lua does it
-- (lib/beat.lua). The daemon's node gateway batches the heartbeats of the nodes it holds:
-- one call per node shard per batch instead of one per node (docs/redis.md, "Heartbeats,
-- batched"). All keys of one call are in one slot (layout 1: the one tag; layout 2: the
-- nodes of one shard).
--
-- Reply: one entry per node, in order: {"OK", current_jobs}, {"STALE_CONN", conn_id} or
-- {"UNKNOWN_NODE"} (never registered, or its info expired: the caller registers it again).
--
-- KEYS[2i-1] {scheduler}:node:info:<node_i>     hash
-- KEYS[2i]   {scheduler}:node:runtime:<node_i>  hash, i = 1..n
-- ARGV[1] now_ms, ARGV[2] key TTL (s) of the nodes' keys, then 5 per node: load_json, load
-- score ('' none), saturated '1' / '0', draining '1' / '', the connection the heartbeat came on
-- (every key of the call is in the first one's slot)
local first_info = KEYS[1]
local now_ms = ARGV[1]
local key_ttl_s = tonumber(ARGV[2])

-- @include beat

local replies = {}
for i = 1, #KEYS / 2 do
  local a = 2 + 5 * (i - 1)
  local info_key = i == 1 and first_info or KEYS[2 * i - 1]
  replies[i] = beat(info_key, KEYS[2 * i], now_ms, ARGV[a + 1], key_ttl_s, ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
                    ARGV[a + 5]) or {'UNKNOWN_NODE'}
end
return replies
