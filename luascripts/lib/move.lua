-- move (library, inlined where a script says "-- @include move"; needs choose_node and slots).
--
-- The body of redispatch_task (layout 1) and shard_redispatch (layout 2): a job whose node was
-- lost leaves it and goes to another node as attempt + 1 (see redispatch_task.lua for the
-- contract). `j` holds the keys (job, old_runtime, old_jobs, leases_key,
-- instances_key), the call's values (job_id, expected_attempt, now_ms, lease_ms, node_ttl_ms,
-- rand, old_node, near, locality_slack), candidates_at = {key base, arg base} of the declared
-- candidates, and preferred / affinity: functions returning the session's preferred pool and
-- the turn's affinity node (read only when needed, as before).
local function move_job(j)
  local job_hash_key, job_id = j.job, j.job_id
  local v = redis.call('HMGET', job_hash_key, 'node_id', 'attempt', 'status', 'conn_id', 'lease_deadline_ts')
  if not v[3] then
    return redis.error_reply('UNKNOWN_JOB no such job')
  end
  local attempt = tonumber(v[2])
  if attempt ~= j.expected_attempt or (v[3] ~= 'dispatched' and v[3] ~= 'waiting') then
    return {'NOOP', v[3], attempt, v[1] or '', v[4] or '', tonumber(v[5] or '0')}
  end
  local pools, nodes, declared = declared_candidates(j.candidates_at[1], j.candidates_at[2])
  local list, err, read = candidate_nodes(j.preferred(), pools, nodes, declared)
  if err == 'STALE_CANDIDATES' then
    return redis.error_reply(err .. ' job ' .. job_id)
  end
  if v[3] == 'dispatched' then
    release_slot(j.old_runtime, j.old_node, j.old_jobs, j.leases_key, job_id)
    redis.call('HSET', job_hash_key, 'status', 'waiting', 'left_node_id', v[1])
  end

  local chosen, conn_id
  if list then
    chosen, err, conn_id = choose_node(list, read, j.affinity(), j.now_ms, j.node_ttl_ms, j.rand, j.old_node, j.near,
                              j.locality_slack, j.instances_key)
  end
  if not chosen then
    return redis.error_reply(err .. ' no node to take job ' .. job_id)
  end
  take_slot(declared.runtime, chosen, nodes[chosen].jobs, job_id, j.leases_key, j.now_ms + j.lease_ms)
  conn_id = conn_id or ''
  redis.call('HSET', job_hash_key, 'node_id', chosen, 'attempt', attempt + 1, 'status', 'dispatched',
    'lease_deadline_ts', j.now_ms + j.lease_ms, 'conn_id', conn_id)
  return {'OK', job_id, chosen, attempt + 1, conn_id}
end
