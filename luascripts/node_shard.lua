-- node_shard: layout 2 (docs/redis.md, "Scheduling shards"). The shard a node belongs to, in
-- the node directory: the one it was given before, else the shard with the fewest nodes,
-- ties broken by the caller's order (the daemon orders the shards so that consecutive ones
-- are on different primaries: nodes spread over the primaries as they spread over shards).
-- Every daemon asks the directory, so all agree on a node's shard.
--
-- A node the caller already knew in a shard (ARGV[2]) that the directory no longer holds
-- (Redis lost the directory's primary's data) gets that shard again: its state is there.
--
-- Reply: the shard (a number).
--
-- KEYS[1] {scheduler}:node_shards        hash node id -> shard
-- KEYS[2] {scheduler}:node_shard_counts  hash shard -> nodes given to it
-- ARGV[1] node id, ARGV[2] the shard the caller knew it in ('' none), ARGV[3...] every shard,
-- in the order ties are broken
local directory = KEYS[1]
local counts = KEYS[2]
local given = redis.call('HGET', directory, ARGV[1])
if given then
  return tonumber(given)
end
local best = ARGV[2]
if best == '' then
  local fewest = math.huge
  for i = 3, #ARGV do
    local n = tonumber(redis.call('HGET', counts, ARGV[i]) or '0')
    if n < fewest then
      best, fewest = ARGV[i], n
    end
  end
end
redis.call('HSET', directory, ARGV[1], best)
redis.call('HINCRBY', counts, best, 1)
return tonumber(best)
