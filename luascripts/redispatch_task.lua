-- redispatch_task: move a job whose node was lost (disconnect, missed heartbeats, expired
-- lease) to another node, as attempt + 1.
--
-- Guarded by expected_attempt: a trigger for an attempt that is no longer current changes
-- nothing ("NOOP"). A dispatched job first leaves its node: the slot is released exactly once
-- (by job-set membership), the lease dropped, the status set to "waiting". Then a node is
-- chosen as in dispatch_task (nodes of ARGV[8] first), never the node it leaves; when none is free the job stays
-- "waiting" at the same attempt and the call can be repeated. Answers of the old attempt are
-- refused by complete_task (NODE_MISMATCH / STALE_ATTEMPT).
--
-- Reply: {"OK", job_id, node_id, attempt, conn_id} (as dispatch_task) or {"NOOP", status, attempt,
-- node_id, conn_id, lease_deadline_ts}: a repeat of a move whose reply was lost (a timeout) finds the job
-- dispatched at attempt + 1 and learns where the lost call put it.
-- Errors: UNKNOWN_JOB, NO_POOL_FOR_LANG_PAIR, EMPTY_POOL, NO_AVAILABLE_NODE (job left waiting),
-- STALE_CANDIDATES (nothing changed: re-read the candidates and call again).
--
-- KEYS[1] {scheduler}:job:<job_id>                 hash
-- KEYS[2] {scheduler}:nodes:runtime                 the runtime table (register_node.lua)
-- KEYS[3] {scheduler}:node:jobs:<old_node_id>      set of the node it leaves
-- KEYS[4] {scheduler}:leases                       zset
-- KEYS[5] {scheduler}:session:<session_id>         hash
-- KEYS[6] {scheduler}:turn:<turn_id>               hash
-- KEYS[7] {scheduler}:lang:<src>:<tgt>             hash pool -> "1" (declared, not read: the candidates' version stands for it, lib/choose_node.lua)
-- KEYS[8] {scheduler}:instances                  zset instance id -> liveness lapse (ms)
-- KEYS[9...] candidates, ARGV[10...] their counts and names (lib/choose_node.lua)
local job_hash_key = KEYS[1]
local old_runtime_key = KEYS[2]
local old_jobs_key = KEYS[3]
local leases_key = KEYS[4]
local session_key = KEYS[5]
local turn_key = KEYS[6]
local instances_key = KEYS[8]
-- ARGV[1] job_id, ARGV[2] expected_attempt, ARGV[3] now_ms, ARGV[4] lease_ms,
-- ARGV[5] node_ttl_ms, ARGV[6] rand, ARGV[7] old node id, ARGV[8] the moving instance (its
-- nodes first, as in dispatch_task), ARGV[9] locality slack
local job_id = ARGV[1]
local expected_attempt = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local node_ttl_ms = tonumber(ARGV[5])
local rand = tonumber(ARGV[6])
local old_node = ARGV[7]
local near = ARGV[8]
local locality_slack = tonumber(ARGV[9])

-- @include choose_node
-- @include slots
-- @include move

return move_job({
  job = job_hash_key, old_runtime = old_runtime_key, old_jobs = old_jobs_key, leases_key = leases_key,
  instances_key = instances_key, job_id = job_id, expected_attempt = expected_attempt,
  now_ms = now_ms, lease_ms = lease_ms, node_ttl_ms = node_ttl_ms, rand = rand, old_node = old_node, near = near,
  locality_slack = locality_slack, candidates_at = {8, 9},
  preferred = function() return redis.call('HGET', session_key, 'preferred_pool') end,
  affinity = function() return redis.call('HGET', turn_key, 'affinity_node_id') end})
