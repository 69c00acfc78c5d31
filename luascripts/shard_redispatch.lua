-- shard_redispatch: layout 2's move (docs/redis.md, "Scheduling shards"), in the job's shard:
-- redispatch_task's contract (lib/move.lua), within the shard, with the session's preferred
-- pool and the turn's affinity node in ARGV instead of read from the session's slot.
--
-- Reply: as redispatch_task's ({"OK", job_id, node_id, attempt, conn_id} or {"NOOP", ...});
-- errors UNKNOWN_JOB, NO_POOL_FOR_LANG_PAIR, EMPTY_POOL, NO_AVAILABLE_NODE, STALE_CANDIDATES.
--
-- KEYS[1] {scheduler:<k>.<i>}:job:<job_id>                 hash
-- KEYS[2] {scheduler:<k>.<i>}:nodes:runtime               the shard's runtime table (register_node.lua)
-- KEYS[3] {scheduler:<k>.<i>}:node:jobs:<old_node_id>      set of the node it leaves
-- KEYS[4] {scheduler:<k>.<i>}:leases                       zset
-- KEYS[5] {scheduler:<k>.<i>}:lang:<src>:<tgt>             hash pool -> "1" (declared, not read: the candidates' version stands for it, lib/choose_node.lua)
-- KEYS[6] {scheduler:<k>.<i>}:instances                    zset instance id -> liveness lapse (ms)
-- KEYS[7...] candidates of this shard, ARGV[12...] their counts and names (lib/choose_node.lua)
-- ARGV[1] job_id, ARGV[2] expected_attempt, ARGV[3] now_ms, ARGV[4] lease_ms, ARGV[5] node_ttl_ms,
-- ARGV[6] rand, ARGV[7] old node id, ARGV[8] the moving instance, ARGV[9] locality slack,
-- ARGV[10] preferred pool, ARGV[11] affinity node ('' for none)
local job_hash_key = KEYS[1]

-- @include choose_node
-- @include slots
-- @include move

return move_job({
  job = job_hash_key, old_runtime = KEYS[2], old_jobs = KEYS[3], leases_key = KEYS[4],
  instances_key = KEYS[6], job_id = ARGV[1], expected_attempt = tonumber(ARGV[2]), now_ms = tonumber(ARGV[3]),
  lease_ms = tonumber(ARGV[4]), node_ttl_ms = tonumber(ARGV[5]), rand = tonumber(ARGV[6]), old_node = ARGV[7],
  near = ARGV[8], locality_slack = tonumber(ARGV[9]), candidates_at = {6, 11},
  preferred = function() return ARGV[10] end, affinity = function() return ARGV[11] end})
