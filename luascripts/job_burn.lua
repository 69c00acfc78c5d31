-- job_burn: layout 2 (docs/redis.md, "Scheduling shards"). A session's new owner found a
-- claim (session_claim) whose job is not in its shard: the old owner may have died between
-- the two steps, or its shard_dispatch may still land. This settles which, atomically in the
-- job's shard: if the job exists, it is replied as it is (the new owner takes it over);
-- otherwise the id is burned (a job hash of status "burned" with the job key, kept for
-- ARGV[4] seconds: the done-TTL, longer than a late call can take), so that a late shard_dispatch of that id finds it and places nothing, and the
-- new owner may claim the job key again under another id (session_claim's `replaces`).
--
-- Reply: {"BURNED"} or {"EXISTS", job_id, node_id, attempt, status, conn_id, lease_deadline_ts}.
--
-- KEYS[1] {scheduler:<k>.<i>}:job:<job_id>  hash
-- ARGV[1] job_key, ARGV[2] job_id, ARGV[3] now_ms, ARGV[4] how long a burned id is kept (s)
local job = KEYS[1]
local made = redis.call('HMGET', job, 'job_key', 'node_id', 'attempt', 'status', 'conn_id', 'lease_deadline_ts')
if made[4] then
  return {'EXISTS', ARGV[2], made[2] or '', tonumber(made[3] or '0'), made[4], made[5] or '', tonumber(made[6] or '0')}
end
redis.call('HSET', job, 'job_id', ARGV[2], 'job_key', ARGV[1], 'status', 'burned', 'finished_ts', ARGV[3])
redis.call('EXPIRE', job, tonumber(ARGV[4]))
return {'BURNED'}
