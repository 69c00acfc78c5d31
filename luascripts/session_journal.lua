-- session_journal: write what sessions' clients are about to receive, fenced by their epochs.
--
-- Each session hash holds, besides what dispatch_task keeps there, its resume journal:
--   epoch        the fencing epoch: 1 when the session opens, +1 at every resume
--   meta         JSON {src_lang, tgt_langs, sample_rate}
--   finalized    utterances finalized so far (the next index to give)
--   u:<index>    JSON of a finalized utterance whose result was not sent yet
--                ({reason, turn_id, deadline_ms})
--   r:<index>    the result message as sent (JSON text); the last `keep` are kept
--   closed       set when the session ended for good (client_close, idle_timeout)
-- The owner writes the journal before sending, so the client never holds a message the
-- journal lacks. One call may carry the writes of many sessions (the instance batches
-- them; every session hash has the {scheduler} tag, so they share a cluster slot). A
-- session whose epoch is not the caller's (it was resumed elsewhere) is left unchanged. A
-- hash without epoch (Redis lost its data) is taken over by the caller's epoch and meta.
--
-- Reply: per session, in KEYS order, {"OK"} or {"FENCED", current epoch}.
--
-- KEYS[i] {scheduler}:session:<session_id>
-- ARGV[1] key ttl (s); then per session: epoch, meta JSON, results kept, n, and n triples:
-- kind ("u" finalized, "r" result, "c" closed), utterance index, payload
local session_keys = KEYS
local ttl_s = tonumber(ARGV[1])
local replies = {}
local a = 2

for k = 1, #session_keys do
  local session_key = session_keys[k]
  local epoch, meta, keep, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local first, last = a + 4, a + 3 + 3 * n
  a = last + 1
  local current = redis.call('HGET', session_key, 'epoch')
  if current and current ~= epoch then
    replies[k] = {'FENCED', current}
  else
    if not current then
      redis.call('HSET', session_key, 'epoch', epoch, 'meta', meta)
    end
    for i = first, last, 3 do
      local kind, index, payload = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
      if kind == 'u' then
        redis.call('HSET', session_key, 'u:' .. index, payload)
        if tonumber(redis.call('HGET', session_key, 'finalized') or '0') <= index then
          redis.call('HSET', session_key, 'finalized', index + 1)
        end
      elseif kind == 'r' then
        redis.call('HSET', session_key, 'r:' .. index, payload)
        redis.call('HDEL', session_key, 'u:' .. index, 'r:' .. (index - keep))
      elseif kind == 'c' then
        redis.call('HSET', session_key, 'closed', payload)
      end
    end
    redis.call('EXPIRE', session_key, ttl_s)
    replies[k] = {'OK'}
  end
end
return replies
