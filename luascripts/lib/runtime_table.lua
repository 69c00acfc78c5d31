-- runtime_table (library, inlined where a script says "-- @include runtime_table").
--
-- The runtime table ({scheduler}:nodes:runtime, register_node.lua) holds nine fields per node,
-- and node choice reads the fields of every candidate with one HMGET. A hash whose fields and
-- values are all small is kept as a listpack (up to hash-max-listpack-entries, 512 in Valkey
-- 9), where every field lookup is a linear scan: one HMGET of 360 fields over 360 entries
-- (40 nodes) then costs more than the 40 HMGETs it replaced. A value longer than
-- hash-max-listpack-value (64 bytes by default) makes Redis keep the hash as a real hash
-- table, for good (a dump reloads it so too): every script that may create the table writes
-- this field with its other fields (an operator who raised hash-max-listpack-value above its
-- length gets the listpack back, and slower node choice with many nodes: docs/redis.md).
local RUNTIME_TABLE_MARK = {
  '#hashtable',
  'the runtime table of the scheduling nodes: this value is longer than hash-max-listpack-value, ' ..
  'so that the table stays a hash table and node choice reads its fields in constant time'}

-- A node's copy of the info fields node choice reads is one field of the table, named by the
-- node's id (its slot count is another, `<node_id>:current_jobs`): the values of
-- RUNTIME_COPY_FIELDS joined by '|'. The owner (an instance id, any text) is last, so that a
-- reader splits the seven before it and takes the rest (lib/choose_node.lua, and
-- scheduler/store/lua.py, runtime_copy). One field per node, not eight: node choice reads
-- every candidate's fields at once, and a field costs Redis about as much as a small command.
local RUNTIME_COPY_FIELDS = {'online', 'draining', 'saturated', 'max_jobs', 'last_heartbeat_ts', 'load_score', 'conn_id',
                             'owner'}

-- runtime_copy(values): the packed copy of `values` (in RUNTIME_COPY_FIELDS order; false or
-- nil as '', as HMGET gives them)
local function runtime_copy(values)
  local parts = {}
  for i = 1, #RUNTIME_COPY_FIELDS do
    parts[i] = values[i] or ''
  end
  return table.concat(parts, '|')
end
