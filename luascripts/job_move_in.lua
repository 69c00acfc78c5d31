-- job_move_in: layout 2's move across shards, last step, in the shard the job moves to
-- (docs/redis.md, "Moves across shards"): after job_move_out left the old job "moved" and
-- claim_move pointed the job key's claim here, the job is created under its new id as it
-- was, "waiting" at the same attempt, on no node of this shard; the caller then moves it to
-- a node here as any waiting job (shard_redispatch: attempt + 1).
--
-- Idempotent: a job of this id for this job key replies {"EXISTS", status, attempt} (a lost
-- reply; or "burned": a release that followed the old job's `moved_to` got here first
-- (job_burn.lua), and the move has nothing left to move).
--
-- Reply: {"OK"} or {"EXISTS", status, attempt}. Errors: JOB_ID_TAKEN (the id is another job
-- key's: the id sequence started again after data loss).
--
-- KEYS[1] {scheduler:<k>.<i>}:job:<job_id>  hash of the job to create
-- ARGV[1] job_id, ARGV[2] job_key, ARGV[3] the id it was (moved_from), ARGV[4] key_ttl_s,
-- ARGV[5...] field, value, ... (the old job's, as job_move_out replied them, without its id,
-- status and end)
local job = KEYS[1]
local made = redis.call('HMGET', job, 'job_key', 'status', 'attempt')
if made[1] then
  if made[1] ~= ARGV[2] then
    return redis.error_reply('JOB_ID_TAKEN job ' .. ARGV[1] .. ' exists')
  end
  return {'EXISTS', made[2] or '', tonumber(made[3] or '0')}
end
for i = 5, #ARGV, 2 do
  redis.call('HSET', job, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', job, 'job_id', ARGV[1], 'job_key', ARGV[2], 'status', 'waiting', 'moved_from', ARGV[3])
redis.call('EXPIRE', job, tonumber(ARGV[4]))
return {'OK'}
