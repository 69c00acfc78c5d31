-- shard_free: layout 2, read only (docs/redis.md, "Moves across shards"). Before a move its
-- shard refused goes to another shard, the placer asks the shards it could go to whether
-- one of their nodes would take a job of the pair now (the node choice of shard_dispatch,
-- lib/choose_node.lua, without taking anything), so that a job moves across shards only
-- towards a free node, never back and forth between full shards.
--
-- Reply: {free, slots}: the free slots of the shard's eligible nodes for the pair, of their
-- slots (0, 0 when none is eligible, or the pair has no pool here).
-- Errors: STALE_CANDIDATES (a node registered since the caller read the candidates).
--
-- KEYS[1] {scheduler:<k>.<i>}:lang:<src>:<tgt>   hash pool -> "1" (declared, not read: the candidates' version stands for it, lib/choose_node.lua)
-- KEYS[2] {scheduler:<k>.<i>}:instances          zset instance id -> liveness lapse (ms)
-- KEYS[3...] candidates of this shard, ARGV[3...] their counts and names (lib/choose_node.lua)
-- ARGV[1] now_ms, ARGV[2] node_ttl_ms
local lang_key = KEYS[1]

-- @include choose_node

local pools, nodes, declared = declared_candidates(2, 2)
local list, err, read = candidate_nodes('', pools, nodes, declared)
if err == 'STALE_CANDIDATES' then
  return redis.error_reply(err)
end
local stats = {free = 0, slots = 0}
if list then
  choose_node(list, read, '', tonumber(ARGV[1]), tonumber(ARGV[2]), 0, '', '', 0, KEYS[2], stats)
end
return {stats.free, stats.slots}
