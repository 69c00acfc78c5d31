-- choose_node (library, inlined where a script says "-- @include choose_node").
--
-- Every key a script touches is declared in KEYS (Redis Cluster: one slot, no computed key
-- names). So the caller declares the candidates it knows of, after the script's fixed keys:
--   KEYS: the shard's runtime table ({scheduler}:nodes:runtime), then each node's job set
--   ARGV: npools, nnodes, the version of the pool tables the caller read them at, the pool
--         names, the node ids, each pool's member count, then each pool's members as
--         1-based indexes into the node ids
-- and the script trusts that list only if the version is still the one in the runtime table
-- (field '#pools': register_node.lua writes a new one whenever it changes a pool's members or
-- a pair's pools). Otherwise (a node registered since the caller last looked) it changes
-- nothing and fails with STALE_CANDIDATES: the caller re-reads the version, the pools and
-- their members, and calls again. The version is read with the candidates' fields, in one
-- HMGET: node choice reads the pool tables themselves not at all.

-- declared_candidates(key_base, arg_base): {pool -> {member ids}}, {node -> {jobs}},
-- {version, runtime} (runtime: the shard's runtime table, the same for every node)
local function declared_candidates(key_base, arg_base)
  local a = arg_base
  local np, nn, version = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  local runtime = KEYS[key_base + 1]
  local ids, nodes = {}, {}
  for i = 1, nn do
    ids[i] = ARGV[a + 3 + np + i]
    nodes[ids[i]] = {jobs = KEYS[key_base + 1 + i]}
  end
  local pools, at = {}, a + 3 + np + nn + np
  for i = 1, np do
    local members = {}
    for k = 1, tonumber(ARGV[a + 3 + np + nn + i]) do
      members[k] = ids[tonumber(ARGV[at + k])]
    end
    at = at + #members
    pools[ARGV[a + 3 + i]] = members
  end
  return pools, nodes, {version = version, runtime = runtime}
end

-- runtime_read(copy, current): a node's runtime as choose_node reads it, from its two fields
-- in the runtime table: its packed copy of the info (lib/runtime_table.lua: online, draining,
-- saturated, max_jobs, last_heartbeat_ts, load_score, conn_id, then the owner, the rest of
-- the text) and its slot count; nil for a node without a copy
local function runtime_read(copy, current)
  if not copy then return nil end
  local online, draining, saturated, max_jobs, heartbeat, score, conn, owner =
    string.match(copy, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return {online = online, draining = draining, saturated = saturated, max_jobs = tonumber(max_jobs or '') or 0,
          heartbeat = tonumber(heartbeat or '') or 0, score = tonumber(score or '') or 0, conn = conn or '',
          owner = owner or '', current = tonumber(current or '0') or 0}
end

-- candidate_nodes(preferred, pools, nodes, declared): the node ids that may take a job of the
-- pair, and what choose_node needs of them (`read`, node -> runtime_read); or nil and
-- STALE_CANDIDATES / NO_POOL_FOR_LANG_PAIR / EMPTY_POOL. Read only: one HMGET of the runtime
-- table (one per 200 nodes), which holds the pool tables' version, each node's slot count and
-- its copy of what choose_node needs of its info (two fields per node; register_node.lua:
-- written with the info by register_node, heartbeats and node_state).
-- Pool choice: the session's preferred pool (`preferred`, its session hash's preferred_pool;
-- nil or '' for none) when it serves the pair, else every pool of the pair.
local function candidate_nodes(preferred, pools, nodes, declared)
  local all = {}
  for node in pairs(nodes) do
    all[#all + 1] = node
  end
  local read, current = {}, nil
  for first = 1, math.max(#all, 1), 200 do
    local fields = {'#pools'}
    for i = first, math.min(first + 199, #all) do
      fields[#fields + 1] = all[i]
      fields[#fields + 1] = all[i] .. ':current_jobs'
    end
    local values = redis.call('HMGET', declared.runtime, unpack(fields))
    current = current or values[1] or ''
    for i = first, math.min(first + 199, #all) do
      local at = 2 * (i - first) + 2
      read[all[i]] = runtime_read(values[at], values[at + 1])
    end
  end
  if current ~= declared.version then
    return nil, 'STALE_CANDIDATES'
  end
  local names = {}
  if preferred and preferred ~= '' and pools[preferred] then
    names = {preferred}
  else
    for pool in pairs(pools) do names[#names + 1] = pool end
    table.sort(names)
  end
  if #names == 0 then
    return nil, 'NO_POOL_FOR_LANG_PAIR'
  end
  local seen, list = {}, {}
  for _, pool in ipairs(names) do
    for _, node in ipairs(pools[pool]) do
      if not seen[node] then
        seen[node] = true
        list[#list + 1] = node
      end
    end
  end
  if #list == 0 then
    return nil, 'EMPTY_POOL'
  end
  return list, nil, read
end

-- choose_node(list, read, affinity, now_ms, node_ttl_ms, rand, exclude, near, slack, instances_key): the
-- turn's affinity node (`affinity`, its turn hash's affinity_node_id; nil or '' for none) if it is in list and eligible; else the least-loaded eligible node (load:
-- current_jobs / max_jobs, or the node's load score when that is higher), ties broken by rand, preferring nodes held by instance `near`
-- (their info's owner; '' prefers none): the least loaded of those wins when its load is at
-- most `slack` above the least loaded of all (locality first: no job crosses instances for
-- a small difference in load). `exclude` (may be '') is never chosen. A node is eligible when
-- online = 1, draining = 0, not saturated (its last heartbeat's load score was above the
-- threshold: heartbeats.lua), its last heartbeat is at most node_ttl_ms old and
-- current_jobs < max_jobs, and the instance holding it (its info's owner) is not known dead:
-- its liveness in instances_key ({scheduler}:instances, id -> lapse time in epoch ms) has not
-- lapsed (the one liveness rule, scheduler/store/liveness.py: an owner not listed counts as alive,
-- as after Redis lost its data; a collected or stopped one is listed with a negative score, dead).
-- Returns the node id, nil and its connection id (register_node), or nil and NO_AVAILABLE_NODE. The affinity node, when chosen, is chosen
-- before the others are weighed (stats then counts only it).
local function choose_node(list, read, affinity, now_ms, node_ttl_ms, rand, exclude, near, slack, instances_key, stats)
  -- whether an owner's liveness lapsed, read once per owner per call (most nodes share a
  -- handful of instances: one ZSCORE each instead of one per node)
  local lapsed_owner = {}
  local function lapsed(owner)
    local known = lapsed_owner[owner]
    if known == nil then
      local lapses = redis.call('ZSCORE', instances_key, owner)
      known = (lapses and tonumber(lapses) < now_ms) and true or false
      lapsed_owner[owner] = known
    end
    return known
  end
  -- load and owner of an eligible node, nil otherwise (with `stats`, a table, its free slots
  -- and its slots are added to stats.free and stats.slots: layout 2 reports a shard's free
  -- share to the placing daemon).
  local conn_of = {}
  local function eligible_load(node)
    if node == exclude then return nil end
    local n = read[node]
    if not n or n.online ~= '1' or n.draining == '1' or n.saturated == '1' then return nil end
    if now_ms - n.heartbeat > node_ttl_ms then return nil end
    if n.current >= n.max_jobs then return nil end
    conn_of[node] = n.conn
    if n.owner ~= '' and lapsed(n.owner) then return nil end
    if stats then stats.free, stats.slots = stats.free + (n.max_jobs - n.current), stats.slots + n.max_jobs end
    return math.max(n.current / n.max_jobs, n.score), n.owner
  end
  local in_list = {}
  for _, node in ipairs(list) do in_list[node] = true end
  if affinity and in_list[affinity] and eligible_load(affinity) then
    return affinity, nil, conn_of[affinity]
  end
  -- the least loaded of all, and of those held by `near`, each with its ties
  local best, ties, best_near, ties_near = math.huge, {}, math.huge, {}
  local function consider(load, node, b, t)
    if load < b - 1e-9 then
      return load, {node}
    elseif load <= b + 1e-9 then
      t[#t + 1] = node
    end
    return b, t
  end
  for _, node in ipairs(list) do
    local load, owner = eligible_load(node)
    if load then
      best, ties = consider(load, node, best, ties)
      if near ~= '' and owner == near then
        best_near, ties_near = consider(load, node, best_near, ties_near)
      end
    end
  end
  if #ties_near > 0 and best_near <= best + (slack or 0) + 1e-9 then
    ties = ties_near
  end
  if #ties == 0 then
    return nil, 'NO_AVAILABLE_NODE'
  end
  local chosen = ties[(rand % #ties) + 1]
  return chosen, nil, conn_of[chosen]
end
