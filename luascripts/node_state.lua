-- node_state: set a node's online / draining flags, only on behalf of the instance that owns it.
--
-- Used when a node socket closes (online=0) and on a node's `drain` (draining=1), so that a
-- stale instance cannot take a node offline that has since reconnected elsewhere. With a
-- connection id (ARGV[4], the closing socket's), a connection that is no longer the node's
-- one (it reconnected, to this same instance too) changes nothing either: the close of the
-- old socket, handled after the new one registered, must not take the new one offline.
-- Offline with a connection id means that connection closed for good: the node's conn_id is
-- cleared too, so that a heartbeat of that connection handled late (heartbeats.lua) or a move
-- check (recovery.py: the placement's conn_id no longer matches) sees it gone. Offline
-- without one (another instance collecting this node's instance, which may yet be alive)
-- keeps it: the node's next heartbeat on that connection brings it back online.
-- Reply: {"OK"}, {"NOT_OWNER", current_owner} or {"STALE_CONN", current conn_id}.
--
-- The runtime table keeps a copy of these fields (node choice reads it: register_node.lua).
--
-- KEYS[1] {scheduler}:node:info:<node_id>  hash
-- KEYS[2] {scheduler}:nodes:runtime        hash, the runtime table
-- ARGV[5] node_id
local info_key = KEYS[1]
local runtime_key = KEYS[2]
-- ARGV[1] owner instance id, ARGV[2] online ("0"/"1"), ARGV[3] draining ("0"/"1"), ARGV[4] conn_id ('' or absent: any)
local owner = ARGV[1]
local online = ARGV[2]
local draining = ARGV[3]
local conn_id = ARGV[4] or ''
local node_id = ARGV[5]

-- @include runtime_table

local info = redis.call('HMGET', info_key, unpack(RUNTIME_COPY_FIELDS))
local current = info[8]
if current ~= owner then
  return {'NOT_OWNER', current or ''}
end
local current_conn = info[7] or ''
if conn_id ~= '' and current_conn ~= conn_id then
  return {'STALE_CONN', current_conn}
end
local fields = {'online', online, 'draining', draining}
info[1], info[2] = online, draining
if online == '0' and conn_id ~= '' then
  fields[#fields + 1] = 'conn_id'
  fields[#fields + 1] = ''
  info[7] = ''
end
redis.call('HSET', info_key, unpack(fields))
if redis.call('EXISTS', runtime_key) == 1 then  -- (an expired table is not made again without its TTL)
  redis.call('HSET', runtime_key, node_id, runtime_copy(info))
end
return {'OK'}
