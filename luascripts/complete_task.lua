-- complete_task: accept a node's answer for a job, once, from the node holding its current attempt.
--
-- Sets status to "finished" or "failed", takes the job out of the node's job set and the
-- leases, and releases the node's slot exactly once (by job-set membership; never below
-- zero). Completing a job that is not "dispatched" changes nothing.
-- The accepted answer (ARGV[7], the outcome JSON the session will get) is kept in the job hash
-- (field `answer`), which is then kept ARGV[8] seconds (at least the result deadline) if that is
-- longer than the done TTL, and so is its job key: until the client was sent its result, any
-- instance that owns or resumes the session can take it from there, by the job key's claim
-- (relay.py, scheduling.stored_answers), so an answer never dies with the process that
-- received it. An empty ARGV[7] stores nothing.
-- Idempotent for its caller: with ARGV[9] = '1' (this call repeats one whose reply was lost,
-- a timeout), a job this same node and attempt already completed as ARGV[3] replies OK again,
-- as the lost call did, and changes nothing; a node sending its answer twice (no ARGV[9])
-- still gets ALREADY_COMPLETED.
-- Reply: {"OK", session_id, job_key, utterance_index, tgt_lang}.
-- Errors: UNKNOWN_JOB, NODE_MISMATCH, STALE_ATTEMPT, ALREADY_COMPLETED, JOBKEY_MISMATCH (KEYS[6] is not
-- this job's job key: caller bug; nothing changed, but the other job's key is given the key
-- TTL, ARGV[10], again: the check and the cut of the TTL are one SET ... XX GET).
--
-- KEYS[1] {scheduler}:job:<job_id>                hash
-- KEYS[2] {scheduler}:nodes:runtime                the runtime table (register_node.lua)
-- KEYS[3] {scheduler}:node:jobs:<node_id>         set of the answering node
-- KEYS[4] {scheduler}:leases                    zset
-- KEYS[5] {scheduler}:jobkey:<job_key>     the job's job key (its TTL is cut as the job's); layout 2
--         leaves it out (the claim is in the session's slot and is kept until its own TTL)
local job_key_hash = KEYS[1]
local runtime_key = KEYS[2]
local jobs_key = KEYS[3]
local leases_key = KEYS[4]
local jobkey_key = KEYS[5]
-- ARGV[1] node_id, ARGV[2] attempt, ARGV[3] status ("finished"/"failed"), ARGV[4] now_ms, ARGV[5] job_id,
-- ARGV[6] done_ttl_s: how long the finished job and its job key are kept (idempotency, then gone),
-- ARGV[7] answer JSON ('' for none), ARGV[8] answer_ttl_s, ARGV[9] '1' for a repeated call,
-- ARGV[10] key_ttl_s (a job key's TTL while its job runs)
local node_id = ARGV[1]
local attempt = tonumber(ARGV[2])
local status = ARGV[3]
local now_ms = ARGV[4]
local job_id = ARGV[5]
local done_ttl_s = tonumber(ARGV[6])
local answer = ARGV[7] or ''
local answer_ttl_s = tonumber(ARGV[8] or '0')
local again = ARGV[9] == '1'
local key_ttl_s = tonumber(ARGV[10])

-- @include slots

local j = redis.call('HMGET', job_key_hash, 'node_id', 'attempt', 'status', 'session_id', 'job_key', 'utterance_index', 'tgt_lang')
if not j[1] then
  return redis.error_reply('UNKNOWN_JOB no such job')
end
if j[1] ~= node_id then
  return redis.error_reply('NODE_MISMATCH job is held by another node')
end
if tonumber(j[2]) ~= attempt then
  return redis.error_reply('STALE_ATTEMPT job is at attempt ' .. j[2])
end
if again and j[3] == status then
  return {'OK', j[4], j[5], tonumber(j[6]), j[7]}
end
if j[3] ~= 'dispatched' then
  return redis.error_reply('ALREADY_COMPLETED job is ' .. j[3])
end
-- how long the job (with its answer) and its job key are kept from now
local kept_s = done_ttl_s
if answer ~= '' and answer_ttl_s > kept_s then
  kept_s = answer_ttl_s
end
if jobkey_key then  -- the job key's TTL is cut, and the key read back in the same command
  local mapped = redis.call('SET', jobkey_key, job_id, 'XX', 'GET', 'EX', kept_s)
  if mapped and mapped ~= job_id then  -- another job's: put back as it was, but for its TTL
    redis.call('SET', jobkey_key, mapped, 'EX', key_ttl_s)
    return redis.error_reply('JOBKEY_MISMATCH ' .. jobkey_key .. ' names job ' .. mapped)
  end
end
-- the audio is no longer needed by anyone: emptied in the same HSET (an empty audio is none,
-- recovery.py), not deleted by a command of its own; the answer is written in it too
local fields = {'status', status, 'finished_ts', now_ms, 'audio', ''}
if answer ~= '' then
  fields[#fields + 1] = 'answer'
  fields[#fields + 1] = answer
end
redis.call('HSET', job_key_hash, unpack(fields))
redis.call('EXPIRE', job_key_hash, kept_s)
release_slot(runtime_key, node_id, jobs_key, leases_key, job_id)
return {'OK', j[4], j[5], tonumber(j[6]), j[7]}
