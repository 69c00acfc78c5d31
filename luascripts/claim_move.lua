-- claim_move: layout 2's move across shards, middle step, in the session's slot
-- (docs/redis.md, "Moves across shards"): the job key's claim (session_claim.lua) follows its
-- job from the id it had (ARGV[1]) to the id it has in another shard (ARGV[2]). A
-- compare-and-set: a claim naming any other job is left as it is (that job answers the key
-- now), and the move has nothing left to move. A claim that is gone (its slot's primary lost
-- its data) is made again. Idempotent (a repeat finds its own claim).
--
-- Reply: {"MOVED"} or {"EXISTS", the job id the claim names}.
--
-- KEYS[1] {s:<session_id>}:jobkey:<job_key>  string -> job id
-- ARGV[1] the job id it leaves, ARGV[2] the job id it becomes, ARGV[3] claim_ttl_s (for a claim
-- made again)
local claim = KEYS[1]
local current = redis.call('GET', claim)
if current == ARGV[2] then
  return {'MOVED'}
end
if current and current ~= ARGV[1] then
  return {'EXISTS', current}
end
if current then
  redis.call('SET', claim, ARGV[2], 'KEEPTTL')
else
  redis.call('SET', claim, ARGV[2], 'EX', tonumber(ARGV[3]))
end
return {'MOVED'}
