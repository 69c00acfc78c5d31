-- session_resume: take a session over (a client reconnected with session_id + resume_from).
--
-- Raises the fencing epoch, so that the previous owner's journal writes (session_journal)
-- and job creations (dispatch_task) are refused from now on, and returns the journal for the
-- new owner to rebuild the session from. See session_journal.lua for the fields.
--
-- Reply: {"OK", new epoch, flat field/value list of the hash}, {"UNKNOWN"} (no such
-- session, or it expired), or {"CLOSED", reason} (it ended for good).
--
-- KEYS[1] {scheduler}:session:<session_id>
-- ARGV[1] the instance taking it over, ARGV[2] key ttl (s)
local session_key = KEYS[1]

if not redis.call('HGET', session_key, 'epoch') then
  return {'UNKNOWN'}
end
local closed = redis.call('HGET', session_key, 'closed')
if closed then
  return {'CLOSED', closed}
end
local epoch = redis.call('HINCRBY', session_key, 'epoch', 1)
redis.call('HSET', session_key, 'owner', ARGV[1])
redis.call('EXPIRE', session_key, tonumber(ARGV[2]))
return {'OK', epoch, redis.call('HGETALL', session_key)}
