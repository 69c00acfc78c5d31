"""Shard tags cover a real 3-master Valkey cluster's primaries evenly (store/shards.py), where
tags drawn by chance do not."""

from __future__ import annotations

import pytest
import redis

from scheduler.store import shards
from scheduler.store.redis_adapter import connect


def test_each_tag_lands_in_its_own_range():
    for count in (1, 2, 3, 4, 6, 12, 48):
        tags = shards.shard_tags(count)
        assert len(set(tags)) == count
        for k, tag in enumerate(tags):
            assert k * 16384 // count <= shards.slot_of_tag(tag) < (k + 1) * 16384 // count
    assert shards.shard_tags(12) == shards.shard_tags(12)  # every daemon computes the same
    with pytest.raises(ValueError):
        shards.shard_tag(3, 3)


@pytest.mark.parametrize("count", [3, 6, 12])
def test_keys_of_the_shards_spread_evenly_over_the_primaries(flushed_cluster_url, count):
    plain = redis.Redis.from_url(flushed_cluster_url)
    ranges = shards.cluster_slot_ranges(plain.execute_command("CLUSTER SLOTS"))
    plain.close()
    primaries = {owner for _, _, owner in ranges}
    assert len(primaries) == 3
    assert set(shards.spread(shards.shard_tags(count), ranges).values()) == {count // 3}
    naive = shards.spread([f"scheduler:{k}" for k in range(12)], ranges)
    assert sorted(naive.values()) != [4, 4, 4]  # chance alone: 6, 3, 3

    cluster = connect(flushed_cluster_url)
    try:
        for tag in shards.shard_tags(count):
            cluster.set("{" + tag + "}:probe", "1")
        sizes = [cluster.dbsize(target_nodes=node) for node in cluster.get_primaries()]
    finally:
        cluster.close()
    assert sizes == [count // 3] * 3
