-- shard_dispatch: layout 2's second step of placing a job, in one placement shard's slot
-- (docs/redis.md, "Scheduling shards"), after session_claim named the job for its job key.
--
-- Creates the job under the claimed id (a job id names its shard) and places it on a node of
-- this shard with a free slot, as dispatch_task does in layout 1 (lib/place.lua: preferred
-- pool, turn affinity, least loaded, nodes of the placing instance first within the slack,
-- ties by rand). The session's preferred pool and the turn's affinity node come in ARGV
-- (session_claim returns them): this script touches no session key.
--
-- Idempotent on the job id: a job of this id made for this job key before (a lost reply, or
-- a claim found by a resuming owner) replies {"EXISTS", job_id, node_id, attempt, status,
-- conn_id, lease_deadline_ts}: what it made, so the caller hands the job to its node. A
-- "burned" job (status "burned", job_burn.lua: a new owner gave up on this claim) replies so
-- too, and the caller claims again under another id. A job of this id for another job key:
-- JOB_ID_TAKEN (the id sequence started again after data loss: the caller takes a new block).
-- A shard that cannot take the job changes nothing (NO_AVAILABLE_NODE, ...): the caller
-- claims again in another shard that serves the pair (session_claim's `replaces`).
--
-- Reply: {"OK", job_id, node_id, 1, conn_id, free, slots} (free: the slots the shard's
-- eligible nodes for the pair had left, of slots, as far as node choice looked: the daemon's
-- hint for choosing a shard) or the long {"EXISTS", ...} above.
-- Errors: NO_POOL_FOR_LANG_PAIR, EMPTY_POOL, NO_AVAILABLE_NODE, STALE_CANDIDATES, JOB_ID_TAKEN.
--
-- KEYS[1] {scheduler:<k>.<i>}:job:<job_id>          hash of the job to create
-- KEYS[2] {scheduler:<k>.<i>}:lang:<src>:<tgt>      hash pool -> "1" (this shard's pools) (declared, not read: the candidates' version stands for it, lib/choose_node.lua)
-- KEYS[3] {scheduler:<k>.<i>}:leases                zset job id -> lease deadline (ms)
-- KEYS[4] {scheduler:<k>.<i>}:instances             zset instance id -> liveness lapse (ms)
-- KEYS[5...] candidates of this shard, ARGV[20...] their counts and names (lib/choose_node.lua)
-- ARGV[1] job_key, ARGV[2] job_id, ARGV[3] session_id, ARGV[4] utterance_index, ARGV[5] src,
-- ARGV[6] tgt, ARGV[7] turn_id, ARGV[8] now_ms, ARGV[9] lease_ms, ARGV[10] node_ttl_ms,
-- ARGV[11] key_ttl_s, ARGV[12] rand, ARGV[13] placed_by, ARGV[14] audio (base64, '' none),
-- ARGV[15] sample_rate, ARGV[16] deadline_ms, ARGV[17] locality_slack,
-- ARGV[18] the session's preferred pool, ARGV[19] the turn's affinity node, as session_claim
-- returned them ('' for none)
local job = KEYS[1]
local job_key = ARGV[1]
local job_id = ARGV[2]

-- @include choose_node
-- @include slots
-- @include place

local made = redis.call('HMGET', job, 'job_key', 'node_id', 'attempt', 'status', 'conn_id', 'lease_deadline_ts')
if made[1] then
  if made[1] ~= job_key then
    return redis.error_reply('JOB_ID_TAKEN job ' .. job_id .. ' exists')
  end
  return {'EXISTS', job_id, made[2] or '', tonumber(made[3] or '0'), made[4] or '', made[5] or '', tonumber(made[6] or '0')}
end
local pools, nodes, declared = declared_candidates(4, 19)
local stats = {free = 0, slots = 0}
local chosen, conn_id = place_job({
  job = job, leases_key = KEYS[3], instances_key = KEYS[4],
  preferred = ARGV[18], affinity = ARGV[19],
  pools = pools, nodes = nodes, declared = declared, job_id = job_id, job_key = job_key, session_id = ARGV[3],
  utterance_index = ARGV[4], src_lang = ARGV[5], tgt_lang = ARGV[6], turn_id = ARGV[7], placed_by = ARGV[13],
  audio = ARGV[14], sample_rate = ARGV[15], deadline_ms = ARGV[16], now_ms = tonumber(ARGV[8]),
  lease_ms = tonumber(ARGV[9]), node_ttl_ms = tonumber(ARGV[10]), key_ttl_s = tonumber(ARGV[11]),
  rand = tonumber(ARGV[12]), locality_slack = tonumber(ARGV[17]), stats = stats})
if not chosen then
  return redis.error_reply(conn_id)
end
return {'OK', job_id, chosen, 1, conn_id, stats.free - 1, stats.slots}
