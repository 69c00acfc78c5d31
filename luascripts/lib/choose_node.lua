-- choose_node (library, inlined where a script says "-- @include choose_node").
--
-- choose_node(lang_key, session_key, turn_key, prefix, now_ms, node_ttl_ms, rand, exclude)
-- Pool choice: the session's preferred_pool when it serves the pair, else every pool of the
-- lang pair. Node choice: the turn's affinity node if it is a candidate and eligible, else
-- the least-loaded (current_jobs / max_jobs) eligible node, ties broken by rand; the node
-- `exclude` (may be '') is never chosen. A node is eligible when online = 1, draining = 0,
-- its last heartbeat is at most node_ttl_ms old and current_jobs < max_jobs.
-- Returns the node id, or nil and an error code: NO_POOL_FOR_LANG_PAIR, EMPTY_POOL,
-- NO_AVAILABLE_NODE.
local function info_hash(prefix, node) return prefix .. ':node:info:{' .. node .. '}' end
local function runtime_hash(prefix, node) return prefix .. ':node:runtime:{' .. node .. '}' end

local function choose_node(lang_key, session_key, turn_key, prefix, now_ms, node_ttl_ms, rand, exclude)
  local pools
  local preferred = redis.call('HGET', session_key, 'preferred_pool')
  if preferred and preferred ~= '' and redis.call('HEXISTS', lang_key, preferred) == 1 then
    pools = {preferred}
  else
    pools = redis.call('HKEYS', lang_key)
  end
  if #pools == 0 then
    return nil, 'NO_POOL_FOR_LANG_PAIR'
  end
  local seen, candidates = {}, {}
  for _, pool in ipairs(pools) do
    for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':pool:{' .. pool .. '}:members')) do
      if not seen[node] then
        seen[node] = true
        candidates[#candidates + 1] = node
      end
    end
  end
  if #candidates == 0 then
    return nil, 'EMPTY_POOL'
  end
  -- current_jobs and max_jobs of an eligible node, nil otherwise
  local function free_slots(node)
    if node == exclude then return nil end
    local info = redis.call('HMGET', info_hash(prefix, node), 'online', 'draining', 'max_jobs', 'last_heartbeat_ts')
    if info[1] ~= '1' or info[2] == '1' then return nil end
    if now_ms - tonumber(info[4] or '0') > node_ttl_ms then return nil end
    local max_jobs = tonumber(info[3] or '0')
    local current = tonumber(redis.call('HGET', runtime_hash(prefix, node), 'current_jobs') or '0')
    if current >= max_jobs then return nil end
    return current, max_jobs
  end
  local affinity = redis.call('HGET', turn_key, 'affinity_node_id')
  if affinity and seen[affinity] and free_slots(affinity) then
    return affinity
  end
  local best, ties = math.huge, {}
  for _, node in ipairs(candidates) do
    local current, max_jobs = free_slots(node)
    if current then
      local load = current / max_jobs
      if load < best - 1e-9 then
        best, ties = load, {node}
      elseif load <= best + 1e-9 then
        ties[#ties + 1] = node
      end
    end
  end
  if #ties == 0 then
    return nil, 'NO_AVAILABLE_NODE'
  end
  return ties[(rand % #ties) + 1]
end
