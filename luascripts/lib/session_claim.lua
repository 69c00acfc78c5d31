-- session_claim (library, inlined where a script says "-- @include session_claim").
--
-- The session's side of placing a job: the fencing check, the claim of the job key, the
-- session's next index and current turn, and the turn's bookkeeping. These keys carry the
-- session's own hash tag in layout 2 (docs/redis.md, "Scheduling shards"); in layout 1 they
-- share the one tag with everything else, and dispatch_task runs this with the placement.

-- claim_read(session_key): what a claim reads of the session hash, in one HMGET:
-- {epoch, preferred_pool, next_utterance_index, finalized, ttl_at}.
local function claim_read(session_key)
  return redis.call('HMGET', session_key, 'epoch', 'preferred_pool', 'next_utterance_index', 'finalized', 'ttl_at')
end

-- claim_fenced(session, session_id, epoch): the FENCED error text when the session hash
-- (`session`, claim_read) holds another epoch than `epoch` (the session was resumed
-- elsewhere), nil otherwise or when `epoch` is '' (not fenced).
local function claim_fenced(session, session_id, epoch)
  local current = session[1]
  if epoch ~= '' and current and current ~= epoch then
    return 'FENCED session ' .. session_id .. ' is at epoch ' .. current
  end
  return nil
end

-- claim_record(jobkey_key, claim, claim_ttl_s, session_key, turn_id, utterance_index, key_ttl_s, entry, session,
-- now_ms):
-- the job key names `claim` (the job's id) for claim_ttl_s (`jobkey_key` nil: the caller
-- claimed it already, dispatch_task's SET NX); the session's current turn
-- follows, and its next index is never lowered. `entry` (the first job of an utterance: its
-- resume-journal entry, session_journal.lua's "u:<index>" JSON; '' for none) is written with
-- `finalized` raised to index + 1 when the journal has not counted this utterance yet
-- (finalized <= index), so that the client's utterance_finalized needs no journal call of its
-- own (docs/redis.md, "The utterance's journal entry, written by its job's creation"); an
-- utterance counted already was journaled by the session's writer, or its result was sent
-- (and maybe trimmed since): it is never written again.
-- The session hash's TTL (key_ttl_s) is renewed when its last renewal by a claim (`ttl_at`,
-- epoch ms, written with it) is half a TTL old or more, or unknown (`now_ms` nil: always): a
-- live session's hash keeps at least half its TTL with one EXPIRE per half TTL, not one per
-- job. Nothing else shortens it (the journal's and a resume's renewals are full ones).
local function claim_record(jobkey_key, claim, claim_ttl_s, session_key, turn_id, utterance_index, key_ttl_s, entry,
                            session, now_ms)
  if jobkey_key then
    redis.call('SET', jobkey_key, claim, 'EX', claim_ttl_s)
  end
  local index = tonumber(utterance_index)
  local fields = {'current_turn_id', turn_id}  -- (`session`: claim_read, earlier in this same script)
  if tonumber(session[3] or '0') <= index then
    fields[#fields + 1] = 'next_utterance_index'
    fields[#fields + 1] = index + 1
  end
  if entry and entry ~= '' and tonumber(session[4] or '0') <= index then
    fields[#fields + 1] = 'u:' .. index
    fields[#fields + 1] = entry
    fields[#fields + 1] = 'finalized'
    fields[#fields + 1] = index + 1
  end
  local renew = not now_ms or not session[5] or now_ms - tonumber(session[5]) >= key_ttl_s * 500
  if renew and now_ms then
    fields[#fields + 1] = 'ttl_at'
    fields[#fields + 1] = now_ms
  end
  redis.call('HSET', session_key, unpack(fields))
  if renew then
    redis.call('EXPIRE', session_key, key_ttl_s)
  end
end

-- claim_affinity(turn_key, turn_action): the node the turn's jobs follow, or nil. A turn has
-- one only after a "keep" job (a max_duration cut: claim_turn), so only "keep" and "end" jobs
-- read it; the session's core sends "none" for a cut of a turn never kept
-- (scheduler/session/core.py, _cut), whose turn hash is not read.
local function claim_affinity(turn_key, turn_action)
  if turn_action == 'keep' or turn_action == 'end' then
    return redis.call('HGET', turn_key, 'affinity_node_id') or nil
  end
  return nil
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
