-- cancel_task: mark a dispatched (or waiting) job cancelled and release its node's slot once.
--
-- Used when the answer is no longer wanted (session ended) or the job could not be handed
-- to its node. A job that is finished, failed or cancelled is left as it is.
-- Reply: {"OK", node_id, attempt} when cancelled (node_id "" for a waiting job),
-- {"NOOP", status} otherwise (also for an unknown job, status ""); a job that moved to another
-- shard (layout 2, job_move_out.lua) replies {"NOOP", "moved", the job id it became}: the
-- caller releases that one.
-- Errors: JOBKEY_MISMATCH (KEYS[5] is not this job's job key: caller bug; nothing changed).
--
-- KEYS[1] {scheduler}:job:<job_id>               hash
-- KEYS[2] {scheduler}:nodes:runtime              the runtime table (register_node.lua)
-- KEYS[3] {scheduler}:node:jobs:<node_id>        set of the node holding the job
-- KEYS[4] {scheduler}:leases                   zset
-- KEYS[5] {scheduler}:jobkey:<job_key>     the job's job key (its TTL is cut to done_ttl_s); layout 2
--         leaves it out (the claim is in the session's slot and is kept until its own TTL)
local job_key_hash = KEYS[1]
local runtime_key = KEYS[2]
local jobs_key = KEYS[3]
local leases_key = KEYS[4]
local jobkey_key = KEYS[5]
-- ARGV[1] now_ms, ARGV[2] job_id, ARGV[3] done_ttl_s (as in complete_task), ARGV[4] node_id (KEYS[3]'s node)
local now_ms = ARGV[1]
local job_id = ARGV[2]
local done_ttl_s = tonumber(ARGV[3])
local node_id = ARGV[4]

-- @include slots

local j = redis.call('HMGET', job_key_hash, 'node_id', 'attempt', 'status')
if j[3] == 'moved' then
  return {'NOOP', 'moved', redis.call('HGET', job_key_hash, 'moved_to') or ''}
end
if j[3] ~= 'dispatched' and j[3] ~= 'waiting' then
  return {'NOOP', j[3] or ''}
end
local mapped = jobkey_key and redis.call('GET', jobkey_key)
if mapped and mapped ~= job_id then
  return redis.error_reply('JOBKEY_MISMATCH ' .. jobkey_key .. ' names job ' .. mapped)
end
redis.call('HSET', job_key_hash, 'status', 'cancelled', 'finished_ts', now_ms)
redis.call('HDEL', job_key_hash, 'audio')  -- no longer needed by anyone
redis.call('EXPIRE', job_key_hash, done_ttl_s)
if jobkey_key then
  redis.call('EXPIRE', jobkey_key, done_ttl_s)
end
release_slot(runtime_key, node_id, jobs_key, leases_key, job_id)  -- a waiting job is in no set: no slot
return {'OK', j[3] == 'dispatched' and j[1] or '', tonumber(j[2])}
