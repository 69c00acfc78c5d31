-- dispatch_task: create the job for job_key at most once and place it on a node with a free slot.
--
-- Idempotent on job_key: if the job exists its current placement is returned ("EXISTS").
-- Pool choice: the session's preferred_pool when it serves the pair, else every pool of the
-- lang pair. Node choice: the turn's affinity node if it is a candidate, online, fresh and has
-- a free slot; else the least-loaded (current_jobs / max_jobs) eligible node, ties broken by
-- ARGV rand. A node is eligible when online = 1, draining = 0, its last heartbeat is at most
-- node_ttl_ms old and current_jobs < max_jobs. Takes one slot on the chosen node.
-- Turn: turn_action "keep" (max_duration finalize) records the chosen node as the turn's
-- affinity; "end" counts this job towards the end of the turn and deletes the turn key once
-- turn_jobs jobs of the ending utterance have been placed.
--
-- Reply: {"OK", job_id, node_id, attempt} or {"EXISTS", job_id, node_id, attempt, status}.
-- Errors: NO_POOL_FOR_LANG_PAIR, EMPTY_POOL, NO_AVAILABLE_NODE.
-- Note: pool members and node hashes are read by computed names (not in KEYS); this script
-- is for a single Redis server. See docs/redis.md.
--
-- KEYS[1] scheduler:jobkey:{job_key}      string -> job id
-- KEYS[2] scheduler:job:id_seq            counter
-- KEYS[3] scheduler:session:{session_id}  hash
-- KEYS[4] scheduler:turn:{turn_id}        hash
-- KEYS[5] scheduler:lang:{src}:{tgt}      hash pool -> "1"
local jobkey_key = KEYS[1]
local id_seq_key = KEYS[2]
local session_key = KEYS[3]
local turn_key = KEYS[4]
local lang_key = KEYS[5]
local job_key = ARGV[1]
local session_id = ARGV[2]
local utterance_index = ARGV[3]
local src_lang = ARGV[4]
local tgt_lang = ARGV[5]
local turn_id = ARGV[6]
local turn_action = ARGV[7]
local now_ms = tonumber(ARGV[8])
local lease_ms = tonumber(ARGV[9])
local node_ttl_ms = tonumber(ARGV[10])
local key_ttl_s = tonumber(ARGV[11])
local rand = tonumber(ARGV[12])
local turn_jobs = tonumber(ARGV[13])
local prefix = ARGV[14]

local function job_hash(id) return prefix .. ':job:{' .. id .. '}' end
local function info_hash(node) return prefix .. ':node:info:{' .. node .. '}' end
local function runtime_hash(node) return prefix .. ':node:runtime:{' .. node .. '}' end
local function members_set(pool) return prefix .. ':pool:{' .. pool .. '}:members' end

local existing = redis.call('GET', jobkey_key)
if existing then
  local j = redis.call('HMGET', job_hash(existing), 'node_id', 'attempt', 'status')
  return {'EXISTS', existing, j[1] or '', tonumber(j[2] or '0'), j[3] or ''}
end

local pools
local preferred = redis.call('HGET', session_key, 'preferred_pool')
if preferred and preferred ~= '' and redis.call('HEXISTS', lang_key, preferred) == 1 then
  pools = {preferred}
else
  pools = redis.call('HKEYS', lang_key)
end
if #pools == 0 then
  return redis.error_reply('NO_POOL_FOR_LANG_PAIR no pool serves ' .. src_lang .. '->' .. tgt_lang)
end

local seen, candidates = {}, {}
for _, pool in ipairs(pools) do
  for _, node in ipairs(redis.call('SMEMBERS', members_set(pool))) do
    if not seen[node] then
      seen[node] = true
      candidates[#candidates + 1] = node
    end
  end
end
if #candidates == 0 then
  return redis.error_reply('EMPTY_POOL no node in the pools of ' .. src_lang .. '->' .. tgt_lang)
end

-- current_jobs and max_jobs of an eligible node, nil otherwise
local function free_slots(node)
  local info = redis.call('HMGET', info_hash(node), 'online', 'draining', 'max_jobs', 'last_heartbeat_ts')
  if info[1] ~= '1' or info[2] == '1' then return nil end
  if now_ms - tonumber(info[4] or '0') > node_ttl_ms then return nil end
  local max_jobs = tonumber(info[3] or '0')
  local current = tonumber(redis.call('HGET', runtime_hash(node), 'current_jobs') or '0')
  if current >= max_jobs then return nil end
  return current, max_jobs
end

local chosen
local affinity = redis.call('HGET', turn_key, 'affinity_node_id')
if affinity and seen[affinity] and free_slots(affinity) then
  chosen = affinity
end
if not chosen then
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
    return redis.error_reply('NO_AVAILABLE_NODE every node serving ' .. src_lang .. '->' .. tgt_lang .. ' is full or offline')
  end
  chosen = ties[(rand % #ties) + 1]
end

redis.call('HINCRBY', runtime_hash(chosen), 'current_jobs', 1)
local job_id = tostring(redis.call('INCR', id_seq_key))
local job = job_hash(job_id)
redis.call('HSET', job,
  'job_id', job_id, 'job_key', job_key, 'node_id', chosen, 'attempt', 1,
  'session_id', session_id, 'utterance_index', utterance_index,
  'src_lang', src_lang, 'tgt_lang', tgt_lang, 'turn_id', turn_id,
  'status', 'dispatched', 'created_ts', now_ms, 'lease_deadline_ts', now_ms + lease_ms)
redis.call('EXPIRE', job, key_ttl_s)
redis.call('SET', jobkey_key, job_id, 'EX', key_ttl_s)
redis.call('HSET', session_key, 'current_turn_id', turn_id)
redis.call('EXPIRE', session_key, key_ttl_s)

if turn_action == 'keep' then
  redis.call('HSET', turn_key, 'affinity_node_id', chosen)
  redis.call('EXPIRE', turn_key, key_ttl_s)
elseif turn_action == 'end' and redis.call('EXISTS', turn_key) == 1 then
  if redis.call('HINCRBY', turn_key, 'ended_jobs', 1) >= turn_jobs then
    redis.call('DEL', turn_key)
  end
end
return {'OK', job_id, chosen, 1}
