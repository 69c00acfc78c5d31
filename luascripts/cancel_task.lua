-- cancel_task: mark a dispatched job cancelled and release its node's slot exactly once.
--
-- Used when the answer is no longer wanted (session ended) or the job could not be handed
-- to its node. A job that is no longer "dispatched" is left as it is.
-- Reply: {"OK", node_id, attempt} when cancelled, {"NOOP", status} otherwise (also for an
-- unknown job, status "").
--
-- KEYS[1] scheduler:job:{job_id}             hash
-- KEYS[2] scheduler:node:runtime:{node_id}   hash of the node holding the job
local job_key_hash = KEYS[1]
local runtime_key = KEYS[2]
-- ARGV[1] now_ms
local now_ms = ARGV[1]

local j = redis.call('HMGET', job_key_hash, 'node_id', 'attempt', 'status')
if j[3] ~= 'dispatched' then
  return {'NOOP', j[3] or ''}
end
redis.call('HSET', job_key_hash, 'status', 'cancelled', 'finished_ts', now_ms)
local current = tonumber(redis.call('HGET', runtime_key, 'current_jobs') or '0')
if current > 0 then
  redis.call('HINCRBY', runtime_key, 'current_jobs', -1)
end
return {'OK', j[1], tonumber(j[2])}
