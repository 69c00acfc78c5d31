-- job_move_out: layout 2's move across shards, first step, in the job's shard (docs/redis.md,
-- "Moves across shards"). A move found no free node in its job's shard (shard_redispatch left
-- the job "waiting", on no node) while another shard serving its pair has one: the job leaves
-- this shard as status "moved", with `moved_to` naming the job id it becomes in the other
-- shard (job_move_in.lua creates it there). Whoever later finds this job "moved" follows
-- `moved_to` (a release: SchedulingClient.cancel). Only a job still waiting at the attempt the
-- caller moved leaves; its fields are replied, for job_move_in (its audio is kept with it for
-- the done-TTL, so that a repeat of this call, after a lost reply, replies them again).
--
-- Reply: {"OK", field, value, ...} (the job hash, as it was before it left) or, when the job
-- is no longer waiting at that attempt (nor left for ARGV[2] at it), {"NOOP", status, attempt,
-- node_id, conn_id, lease_deadline_ts} (as a move's NOOP).
--
-- KEYS[1] {scheduler:<k>.<i>}:job:<job_id>  hash
-- ARGV[1] expected attempt, ARGV[2] the job id it becomes, ARGV[3] now_ms, ARGV[4] done_ttl_s
local job = KEYS[1]
local v = redis.call('HMGET', job, 'status', 'attempt', 'node_id', 'conn_id', 'lease_deadline_ts', 'moved_to')
local at = tonumber(v[2]) == tonumber(ARGV[1])
if at and v[1] == 'moved' and v[6] == ARGV[2] then  -- a repeat (job_move_in skips status and moved_to)
  local fields = redis.call('HGETALL', job)
  table.insert(fields, 1, 'OK')
  return fields
end
if v[1] ~= 'waiting' or not at then
  return {'NOOP', v[1] or '', tonumber(v[2] or '0'), v[3] or '', v[4] or '', tonumber(v[5] or '0')}
end
local fields = redis.call('HGETALL', job)
redis.call('HSET', job, 'status', 'moved', 'moved_to', ARGV[2], 'finished_ts', ARGV[3])
redis.call('EXPIRE', job, tonumber(ARGV[4]))
table.insert(fields, 1, 'OK')
return fields
