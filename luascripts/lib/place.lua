-- place (library, inlined where a script says "-- @include place"; needs choose_node and slots).
--
-- The shard's side of placing a new job: choose a node, take its slot, create the job hash.

-- place_job(j): j holds job (the job hash key), leases_key, instances_key, preferred,
-- affinity, pools, nodes, declared (declared_candidates), the job's fields (job_id, job_key, session_id,
-- utterance_index, src_lang, tgt_lang, turn_id, placed_by, audio, sample_rate, deadline_ms)
-- and the placement's (now_ms, lease_ms, node_ttl_ms, key_ttl_s, rand, locality_slack); `stats`
-- (optional, a table with free = 0, slots = 0) gets the free slots and the slots of the
-- eligible nodes (choose_node).
-- Returns the chosen node and its connection id, or nil and the error text.
local function place_job(j)
  local list, err, read = candidate_nodes(j.preferred, j.pools, j.nodes, j.declared)
  local chosen, conn_id
  if list then
    chosen, err, conn_id = choose_node(list, read, j.affinity, j.now_ms, j.node_ttl_ms, j.rand, '', j.placed_by,
                              j.locality_slack, j.instances_key, j.stats)
  end
  if not chosen then
    return nil, err .. ' ' .. j.src_lang .. '->' .. j.tgt_lang
  end
  local nodes = j.nodes
  take_slot(j.declared.runtime, chosen, nodes[chosen].jobs, j.job_id, j.leases_key, j.now_ms + j.lease_ms)
  conn_id = conn_id or ''
  local fields = {
    'job_id', j.job_id, 'job_key', j.job_key, 'node_id', chosen, 'attempt', 1,
    'session_id', j.session_id, 'utterance_index', j.utterance_index,
    'src_lang', j.src_lang, 'tgt_lang', j.tgt_lang, 'turn_id', j.turn_id,
    'status', 'dispatched', 'created_ts', j.now_ms, 'lease_deadline_ts', j.now_ms + j.lease_ms,
    'placed_by', j.placed_by, 'sample_rate', j.sample_rate, 'deadline_ms', j.deadline_ms, 'conn_id', conn_id}
  if j.audio ~= '' then
    fields[#fields + 1] = 'audio'
    fields[#fields + 1] = j.audio
  end
  redis.call('HSET', j.job, unpack(fields))
  redis.call('EXPIRE', j.job, j.key_ttl_s)
  -- (leases of jobs nobody will complete, their instance dead or their hash expired, are
  -- dropped by the orphan sweep, placement/recovery.py: not trimmed here at every placement)
  return chosen, conn_id
end
