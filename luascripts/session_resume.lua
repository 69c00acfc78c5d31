-- session_resume: take a session over (a client reconnected with session_id + resume_token + resume_from).
--
-- Raises the fencing epoch, so that the previous owner's journal writes (session_journal)
-- and job creations (dispatch_task) are refused from now on, and returns the journal for the
-- new owner to rebuild the session from. See session_journal.lua for the fields.
--
-- Only the holder of the session's resume secret may do that: `meta` (JSON) holds `auth`,
-- the SHA-256 of the resume token the session was opened with (and of the API key that
-- opened it, journal.py resume_digest); the caller passes the digest of what the client
-- presented. They are compared in constant time (every one of the 64 characters, always),
-- before anything else is read or changed: a refused resume fences nobody and does not tell
-- whether the session has ended. A session without `auth` (a journal written before resume
-- tokens existed) cannot be resumed.
--
-- Reply: {"OK", new epoch, flat field/value list of the hash}, {"UNKNOWN"} (no such
-- session, or it expired), {"DENIED"} (the digest does not match) or {"CLOSED", reason}
-- (it ended for good). The daemon answers the client the same for all three refusals.
--
-- KEYS[1] {scheduler}:session:<session_id>
-- ARGV[1] the instance taking it over, ARGV[2] key ttl (s), ARGV[3] digest presented (64 hex characters)
local session_key = KEYS[1]
local owner = ARGV[1]
local ttl_s = tonumber(ARGV[2])
local presented = ARGV[3]

if not redis.call('HGET', session_key, 'epoch') then
  return {'UNKNOWN'}
end
local ok, meta = pcall(cjson.decode, redis.call('HGET', session_key, 'meta') or '')
local expected = (ok and type(meta) == 'table' and type(meta.auth) == 'string') and meta.auth or ''
local differ = (#expected == 64 and #presented == 64) and 0 or 1
for i = 1, 64 do
  if string.byte(expected, i) ~= string.byte(presented, i) then
    differ = 1
  end
end
if differ ~= 0 then
  return {'DENIED'}
end
local closed = redis.call('HGET', session_key, 'closed')
if closed then
  return {'CLOSED', closed}
end
local epoch = redis.call('HINCRBY', session_key, 'epoch', 1)
redis.call('HSET', session_key, 'owner', owner)
redis.call('EXPIRE', session_key, ttl_s)
return {'OK', epoch, redis.call('HGETALL', session_key)}
