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
-- journal lacks; the "u" entry of an utterance is usually written (with `finalized`) by the
-- creation of its first job instead (lib/session_claim.lua, claim_record), and then not here.
-- A writer whose epoch is not the current one (its session was resumed elsewhere) changes
-- nothing. A hash without epoch (Redis lost its data) is taken over by
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

local reply = {'OK'}
local state = redis.call('HMGET', session_key, 'epoch', 'finalized')
local current = state[1]
if not current then
  redis.call('HSET', session_key, 'epoch', epoch, 'meta', ARGV[3])
  reply = {'OK', 'NEW'}
elseif current ~= epoch then
  return {'FENCED', current}
end
-- one HSET of every field written and one HDEL of every field dropped (an "r" drops its
-- utterance's "u" and the result `keep` places back; indexes only grow within a batch, so
-- nothing dropped is written again by the same call)
local finalized = tonumber(state[2] or '0')
local target = math.max(finalized, floor or 0)
local written, dropped = {}, {}
local results_only = #ARGV >= 6 and reply[2] ~= 'NEW'
for i = 6, #ARGV, 3 do
  local kind, index, payload = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  results_only = results_only and kind == 'r'
  if kind == 'u' or kind == 'r' then
    written[#written + 1] = kind .. ':' .. index
    written[#written + 1] = payload
    target = math.max(target, index + 1)
    if kind == 'r' then
      dropped[#dropped + 1] = 'u:' .. index
      dropped[#dropped + 1] = 'r:' .. (index - keep)
    end
  elseif kind == 'c' then
    written[#written + 1] = 'closed'
    written[#written + 1] = payload
  end
end
if target > finalized then
  written[#written + 1] = 'finalized'
  written[#written + 1] = target
end
if #written > 0 then
  redis.call('HSET', session_key, unpack(written))
end
if #dropped > 0 then
  redis.call('HDEL', session_key, unpack(dropped))
end
-- The TTL is renewed by every call but one that writes results alone: a result's utterance
-- had its TTL renewed when it was journaled, by its job's creation (claim_record) or by a
-- call here, one result deadline ago at most.
if not results_only then
  redis.call('EXPIRE', session_key, ttl_s)
end
return reply
