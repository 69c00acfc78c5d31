-- session_journal: write what a session's client is about to receive, fenced by the epoch.
--
-- The session hash holds, besides what dispatch_task keeps there, the resume journal:
--   epoch        the fencing epoch: 1 when the session opens, +1 at every resume
--   meta         JSON {src_lang, tgt_langs, sample_rate}
--   finalized    utterances finalized so far (the next index to give)
--   u:<index>    JSON of a finalized utterance whose result was not sent yet
--                ({reason, turn_id, deadline_ms})
--   r:<index>    the result message as sent (JSON text); the last ARGV[4] are kept
--   closed       set when the session ended for good (client_close, idle_timeout)
-- The owner writes the journal before sending, so the client never holds a message the
-- journal lacks. A writer whose epoch is not the current one (its session was resumed
-- elsewhere) changes nothing. A hash without epoch (Redis lost its data) is taken over by
-- the caller's epoch and meta, and the reply says so ("NEW"): the caller then writes again
-- what it still owes (journal.py, Journal.reassert). `finalized` never goes down: it is at
-- least ARGV[5] (the writer's own count, '' for none) and one past every index written.
--
-- Reply: {"OK"}, {"OK", "NEW"} (the hash had no journal) or {"FENCED", current epoch}.
--
-- KEYS[1] {scheduler}:session:<session_id>
-- ARGV[1] epoch, ARGV[2] key ttl (s), ARGV[3] meta JSON, ARGV[4] results kept, ARGV[5] finalized floor,
-- ARGV[6...] triples: kind ("u" finalized, "r" result, "c" closed), utterance index, payload
local session_key = KEYS[1]
local epoch = ARGV[1]
local ttl_s = tonumber(ARGV[2])
local keep = tonumber(ARGV[4])
local floor = tonumber(ARGV[5])

local function finalized_at_least(n)
  if n and tonumber(redis.call('HGET', session_key, 'finalized') or '0') < n then
    redis.call('HSET', session_key, 'finalized', n)
  end
end

local reply = {'OK'}
local current = redis.call('HGET', session_key, 'epoch')
if not current then
  redis.call('HSET', session_key, 'epoch', epoch, 'meta', ARGV[3])
  reply = {'OK', 'NEW'}
elseif current ~= epoch then
  return {'FENCED', current}
end
finalized_at_least(floor)

for i = 6, #ARGV, 3 do
  local kind, index, payload = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if kind == 'u' then
    redis.call('HSET', session_key, 'u:' .. index, payload)
    finalized_at_least(index + 1)
  elseif kind == 'r' then
    redis.call('HSET', session_key, 'r:' .. index, payload)
    finalized_at_least(index + 1)
    redis.call('HDEL', session_key, 'u:' .. index, 'r:' .. (index - keep))
  elseif kind == 'c' then
    redis.call('HSET', session_key, 'closed', payload)
  end
end
redis.call('EXPIRE', session_key, ttl_s)
return reply
