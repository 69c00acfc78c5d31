-- session_claim (library, inlined where a script says "-- @include session_claim").
--
-- The session's side of placing a job: the fencing check, the claim of the job key, the
-- session's next index and current turn, and the turn's bookkeeping. These keys carry the
-- session's own hash tag in layout 2 (docs/redis.md, "Scheduling shards"); in layout 1 they
-- share the one tag with everything else, and dispatch_task runs this with the placement.

-- claim_fenced(session_key, session_id, epoch): the FENCED error text when the session hash
-- holds another epoch than `epoch` (the session was resumed elsewhere), nil otherwise or
-- when `epoch` is '' (not fenced).
local function claim_fenced(session_key, session_id, epoch)
  if epoch ~= '' then
    local current = redis.call('HGET', session_key, 'epoch')
    if current and current ~= epoch then
      return 'FENCED session ' .. session_id .. ' is at epoch ' .. current
    end
  end
  return nil
end

-- claim_record(jobkey_key, claim, claim_ttl_s, session_key, turn_id, utterance_index, key_ttl_s):
-- the job key names `claim` (the job's id) for claim_ttl_s; the session's current turn
-- follows, and its next index is never lowered.
local function claim_record(jobkey_key, claim, claim_ttl_s, session_key, turn_id, utterance_index, key_ttl_s)
  redis.call('SET', jobkey_key, claim, 'EX', claim_ttl_s)
  redis.call('HSET', session_key, 'current_turn_id', turn_id)
  if tonumber(redis.call('HGET', session_key, 'next_utterance_index') or '0') <= tonumber(utterance_index) then
    redis.call('HSET', session_key, 'next_utterance_index', tonumber(utterance_index) + 1)
  end
  redis.call('EXPIRE', session_key, key_ttl_s)
end

-- claim_turn(turn_key, turn_action, node, turn_jobs, key_ttl_s): "keep" (a max_duration
-- finalize: the turn goes on) records `node` as the turn's affinity; "end" counts this job
-- towards the end of the turn and deletes the turn key once turn_jobs jobs of the ending
-- utterance have been placed.
local function claim_turn(turn_key, turn_action, node, turn_jobs, key_ttl_s)
  if turn_action == 'keep' then
    redis.call('HSET', turn_key, 'affinity_node_id', node)
    redis.call('EXPIRE', turn_key, key_ttl_s)
  elseif turn_action == 'end' and redis.call('EXISTS', turn_key) == 1 then
    if redis.call('HINCRBY', turn_key, 'ended_jobs', 1) >= turn_jobs then
      redis.call('DEL', turn_key)
    end
  end
end
