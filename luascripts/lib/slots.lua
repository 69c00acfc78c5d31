-- slots (library, inlined where a script says "-- @include slots").
--
-- A job holds a slot on its node exactly while it is in the node's job set
-- ({scheduler}:node:jobs:<node>); the node's current_jobs (field `<node>:current_jobs` of the
-- shard's runtime table, {scheduler}:nodes:runtime: register_node.lua) moves only together
-- with that set, so a slot is taken once and released once, and current_jobs never goes
-- below zero.

-- take_slot: the job is now held by `node`, whose job set is given (slot, job set, lease);
-- runtime_key: the shard's runtime table.
local function take_slot(runtime_key, node, jobs_key, job_id, leases_key, lease_deadline)
  redis.call('HINCRBY', runtime_key, node .. ':current_jobs', 1)
  redis.call('SADD', jobs_key, job_id)
  redis.call('ZADD', leases_key, lease_deadline, job_id)
end

-- release_slot: the job leaves its node: out of the leases and the node's job set, and the
-- slot released if (and only if) it was still in that set. One HINCRBY: the count goes below
-- zero only when the runtime table expired, or the node's count was written anew, since the
-- slot was taken; then it is put back as it was (a table made by the HINCRBY alone would
-- have no TTL).
local function release_slot(runtime_key, node, jobs_key, leases_key, job_id)
  redis.call('ZREM', leases_key, job_id)
  local field = node .. ':current_jobs'
  if redis.call('SREM', jobs_key, job_id) == 1 and redis.call('HINCRBY', runtime_key, field, -1) < 0 then
    if redis.call('HLEN', runtime_key) == 1 then
      redis.call('DEL', runtime_key)
    else
      redis.call('HSET', runtime_key, field, 0)
    end
  end
end
