-- dispatch_task: create the job for job_key at most once and place it on a node with a free slot.
--
-- Idempotent on job_key: if a job exists for it, nothing changes and its id is returned
-- ("EXISTS"). Otherwise the job is created under the id the caller allocated (blocks of
-- {scheduler}:job:id_seq, see scheduler/scheduling.py), so that its hash is a declared key.
-- The session's side (fencing, the job key, next index, turn) is lib/session_claim.lua, the
-- shard's (node choice, slot, job hash) lib/place.lua.
-- Pool and node choice: lib/choose_node.lua (preferred pool, turn affinity, least loaded,
-- nodes held by the placing instance (ARGV[16]) first within ARGV[20] of load, ties by ARGV rand). Takes one slot on the chosen node, adds the job to the node's job set
-- and its lease to the leases set.
-- Session: current_turn_id and next_utterance_index (never lowered) follow the jobs created;
-- the first job of an utterance writes its resume-journal entry (ARGV[21], claim_record).
-- Turn: turn_action "keep" (max_duration finalize) records the chosen node as the turn's
-- affinity, which later "keep" and "end" jobs of the turn follow ("none": a turn never kept,
-- whose affinity is not read); "end" counts this job towards the end of the turn and deletes the turn key once
-- turn_jobs jobs of the ending utterance have been placed.
--
-- Fencing: with ARGV[15] (the caller's session epoch) set and the session hash holding
-- another epoch, the session was resumed elsewhere: nothing changes (FENCED). The job
-- records the instance that placed it (ARGV[16]) as placed_by, for the orphan sweep.
--
-- Audio: the job keeps its audio (ARGV[17], base64; '' keeps none), sample rate and result
-- deadline (epoch ms) until it is answered or cancelled, and the chosen node's connection id,
-- so that an instance resuming the session after its owner died can take the job over and
-- place it again if its node is gone too (dispatcher.py, "adopt").
--
-- Reply: {"OK", job_id, node_id, attempt, conn_id} or {"EXISTS", job_id}; conn_id is the chosen
-- node's connection id (register_node), so the caller can tell when that connection is gone.
-- A repeat of a call whose reply was lost (same job key, same job id: Redis timed out) gets
-- {"EXISTS", job_id, node_id, attempt, status, conn_id, lease_deadline_ts}: what the lost call made, so the
-- caller can hand the job to its node instead of taking it for a duplicate.
-- Errors: NO_POOL_FOR_LANG_PAIR, EMPTY_POOL, NO_AVAILABLE_NODE, STALE_CANDIDATES (nothing
-- changed: re-read the candidates and call again), JOB_ID_TAKEN (caller bug), FENCED.
--
-- KEYS[1] {scheduler}:jobkey:<job_key>      string -> job id
-- KEYS[2] {scheduler}:job:<job_id>          hash of the job to create
-- KEYS[3] {scheduler}:session:<session_id>  hash
-- KEYS[4] {scheduler}:turn:<turn_id>        hash
-- KEYS[5] {scheduler}:lang:<src>:<tgt>      hash pool -> "1" (declared, not read: the candidates' version stands for it, lib/choose_node.lua)
-- KEYS[6] {scheduler}:leases                zset job id -> lease deadline (ms)
-- KEYS[7] {scheduler}:instances            zset instance id -> liveness lapse (ms): no node of a dead instance
-- KEYS[8...] candidates, ARGV[22...] their counts and names (lib/choose_node.lua)
local jobkey_key = KEYS[1]
local job = KEYS[2]
local session_key = KEYS[3]
local turn_key = KEYS[4]
local leases_key = KEYS[6]
local instances_key = KEYS[7]
local job_key = ARGV[1]
local job_id = ARGV[2]
local session_id = ARGV[3]
local utterance_index = ARGV[4]
local src_lang = ARGV[5]
local tgt_lang = ARGV[6]
local turn_id = ARGV[7]
local turn_action = ARGV[8]
local now_ms = tonumber(ARGV[9])
local lease_ms = tonumber(ARGV[10])
local node_ttl_ms = tonumber(ARGV[11])
local key_ttl_s = tonumber(ARGV[12])
local rand = tonumber(ARGV[13])
local turn_jobs = tonumber(ARGV[14])
local epoch = ARGV[15]
local placed_by = ARGV[16]
local audio = ARGV[17]        -- base64 PCM, '' for none
local sample_rate = ARGV[18]
local deadline_ms = ARGV[19]  -- the utterance's result deadline, epoch ms
local locality_slack = tonumber(ARGV[20])  -- see choose_node: how much more load a node of this instance may carry
local journal_entry = ARGV[21]  -- the utterance's resume-journal entry ('' none): lib/session_claim.lua, claim_record

-- @include choose_node
-- @include slots
-- @include place
-- @include session_claim

local session = claim_read(session_key)
local fenced = claim_fenced(session, session_id, epoch)
if fenced then
  return redis.error_reply(fenced)
end

-- The job key is claimed first (SET NX: one command where a GET and a SET were) and let go
-- again when no job is made, so a refusal still leaves nothing behind.
if not redis.call('SET', jobkey_key, job_id, 'NX', 'EX', key_ttl_s) then
  local existing = redis.call('GET', jobkey_key)
  if existing == job_id then  -- this very call ran before (its reply was lost): what it made
    local made = redis.call('HMGET', job, 'node_id', 'attempt', 'status', 'conn_id', 'lease_deadline_ts')
    return {'EXISTS', existing, made[1] or '', tonumber(made[2] or '0'), made[3] or '', made[4] or '', tonumber(made[5] or '0')}
  end
  return {'EXISTS', existing}
end
if redis.call('EXISTS', job) == 1 then
  redis.call('DEL', jobkey_key)
  return redis.error_reply('JOB_ID_TAKEN job ' .. job_id .. ' exists')
end

local pools, nodes, declared = declared_candidates(7, 21)
local chosen, conn_id = place_job({
  job = job, leases_key = leases_key, instances_key = instances_key,
  preferred = session[2], affinity = claim_affinity(turn_key, turn_action),
  pools = pools, nodes = nodes, declared = declared, job_id = job_id, job_key = job_key, session_id = session_id,
  utterance_index = utterance_index, src_lang = src_lang, tgt_lang = tgt_lang, turn_id = turn_id, placed_by = placed_by,
  audio = audio, sample_rate = sample_rate, deadline_ms = deadline_ms, now_ms = now_ms, lease_ms = lease_ms,
  node_ttl_ms = node_ttl_ms, key_ttl_s = key_ttl_s, rand = rand, locality_slack = locality_slack})
if not chosen then
  redis.call('DEL', jobkey_key)  -- refused: the claim is let go
  return redis.error_reply(conn_id)
end
claim_record(nil, job_id, key_ttl_s, session_key, turn_id, utterance_index, key_ttl_s, journal_entry, session, now_ms)
claim_turn(turn_key, turn_action, chosen, turn_jobs, key_ttl_s)
return {'OK', job_id, chosen, 1, conn_id}
