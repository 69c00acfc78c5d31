-- session_claim: layout 2's first step of placing a job, in the session's own slot
-- (docs/redis.md, "Scheduling shards"). The second step, shard_dispatch, creates the job in
-- the shard the claim names. With one shard (layout 1) dispatch_task does both in one script.
--
-- Fencing: with ARGV[9] (the caller's session epoch) set and the session hash holding another
-- epoch, the session was resumed elsewhere: nothing changes (FENCED).
-- The claim: the job key names the job that answers it (ARGV[2], a job id that names its
-- shard). Idempotent: a repeat of the same claim (a lost reply) replies CLAIMED again and
-- counts nothing twice. A job key claimed for another job replies {"EXISTS", that job id},
-- unless that id is ARGV[11] (`replaces`: a claim the caller found dead, e.g. a shard that
-- refused the job, or a job burned in its shard): then it is replaced (compare-and-set).
-- A fresh claim moves the session's current turn and next index (never lowered) and counts
-- a turn's end ("end": the turn key is deleted once ARGV[8] jobs of the ending utterance are
-- claimed); a replaced one does not count again.
-- Affinity: ARGV[10] is the node the turn's previous job went to when that job kept the turn
-- going ("keep"), '' otherwise or if unknown; given, it is stored as the turn's affinity
-- (layout 1 stores the chosen node at the "keep" job's own dispatch; here the node is known
-- only after the claim). The turn's affinity is returned, for shard_dispatch.
--
-- Reply: {"CLAIMED", job_id, preferred_pool, affinity_node} or {"EXISTS", job_id}.
-- Errors: FENCED.
--
-- KEYS[1] {s:<session_id>}:session:<session_id>  hash
-- KEYS[2] {s:<session_id>}:turn:<turn_id>        hash
-- KEYS[3] {s:<session_id>}:jobkey:<job_key>      string -> job id
-- ARGV[1] job_key, ARGV[2] job_id, ARGV[3] session_id, ARGV[4] utterance_index, ARGV[5] turn_id,
-- ARGV[6] turn_action ("keep", "end" or ""), ARGV[7] key_ttl_s (the session's and turn's),
-- ARGV[8] turn_jobs, ARGV[9] epoch ('' not fenced), ARGV[10] affinity node, ARGV[11] replaces,
-- ARGV[12] claim_ttl_s (how long the claim is kept: past the result deadline), ARGV[13] the
-- utterance's resume-journal entry ('' none; a fresh claim writes it: lib/session_claim.lua, claim_record),
-- ARGV[14] now_ms ('' or absent: the session's TTL is renewed at every claim, else once per half TTL)
local session_key = KEYS[1]
local turn_key = KEYS[2]
local jobkey_key = KEYS[3]
local job_id = ARGV[2]
local session_id = ARGV[3]
local utterance_index = ARGV[4]
local turn_id = ARGV[5]
local turn_action = ARGV[6]
local key_ttl_s = tonumber(ARGV[7])
local turn_jobs = tonumber(ARGV[8])
local epoch = ARGV[9]
local affinity = ARGV[10]
local replaces = ARGV[11]
local claim_ttl_s = tonumber(ARGV[12])
local journal_entry = ARGV[13] or ''
local now_ms = tonumber(ARGV[14] or '')  -- (nil: the session's TTL is renewed at every claim)

-- @include session_claim

local session = claim_read(session_key)
local fenced = claim_fenced(session, session_id, epoch)
if fenced then
  return redis.error_reply(fenced)
end
local existing = redis.call('GET', jobkey_key)
if existing and existing ~= job_id and (replaces == '' or existing ~= replaces) then
  return {'EXISTS', existing}
end
local stored = claim_affinity(turn_key, turn_action) or ''
if existing ~= job_id then
  claim_record(jobkey_key, job_id, claim_ttl_s, session_key, turn_id, utterance_index, key_ttl_s, journal_entry, session,
               now_ms)
  if affinity ~= '' then
    claim_turn(turn_key, 'keep', affinity, turn_jobs, key_ttl_s)
    stored = affinity
  end
  if turn_action == 'end' and not existing then
    claim_turn(turn_key, 'end', '', turn_jobs, key_ttl_s)
  end
end
return {'CLAIMED', job_id, session[2] or '', stored}
