"""The hash tags of scheduling shards, chosen so that they cover a cluster's primaries evenly.

Layout 2 (docs/redis.md, "Scheduling shards") splits placement state into S shards, each
with its own Redis Cluster hash tag. Redis Cluster puts a key on slot CRC16(tag) mod 16384,
and a primary owns ranges of slots. Tags drawn by chance spread unevenly: ``{scheduler:0}``
... ``{scheduler:11}`` land 6, 3 and 3 on the three equal slot ranges of a 3-primary cluster.

So the tags are fixed, not drawn: shard k of S takes the first tag ``scheduler:k.i``
(i = 0, 1, ...) whose slot lies in the k-th of S equal slot ranges. Every daemon computes
the same tags from S alone, whatever cluster it meets. A cluster whose primaries own equal
slot ranges (what ``valkey-cli --cluster create`` makes) and whose primary count divides S
gets S / P shards on each primary; S = 12 covers 1, 2, 3, 4 and 6 primaries evenly. A
cluster resharded unevenly gets what its ranges say: :func:`spread` counts it, for the
start-up log.

The daemon places by these shards with `--redis-shards S` (store/placing.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

SLOTS = REDIS_CLUSTER_HASH_SLOTS  # 16384


def slot_of_tag(tag: str) -> int:
    """The cluster slot of every key carrying ``{tag}``."""
    return key_slot(("{" + tag + "}").encode())


def shard_tag(k: int, count: int) -> str:
    """The hash tag (without braces) of shard ``k`` of ``count``: the first ``scheduler:k.i``
    whose slot is in the k-th of ``count`` equal slot ranges."""
    if not 0 <= k < count <= SLOTS:
        raise ValueError(f"shard {k} of {count}: need 0 <= k < count <= {SLOTS}")
    low, high = k * SLOTS // count, (k + 1) * SLOTS // count
    i = 0
    while True:  # CRC16 is uniform enough that a range of r slots is hit within ~SLOTS / r tries
        tag = f"scheduler:{k}.{i}"
        if low <= slot_of_tag(tag) < high:
            return tag
        i += 1


def shard_tags(count: int) -> list[str]:
    return [shard_tag(k, count) for k in range(count)]


def spread(tags: Iterable[str], slot_ranges: Sequence[tuple[int, int, str]]) -> dict[str, int]:
    """How many of ``tags`` each primary owns, from ``slot_ranges`` (first slot, last slot,
    primary id) as ``CLUSTER SLOTS`` lists them; a primary that owns none is listed with 0."""
    owners = {owner: 0 for _, _, owner in slot_ranges}
    counts = Counter(next((owner for first, last, owner in slot_ranges if first <= slot_of_tag(tag) <= last), "unowned")
                     for tag in tags)
    return {**owners, **counts}


def cluster_slot_ranges(cluster_slots: Sequence) -> list[tuple[int, int, str]]:
    """``CLUSTER SLOTS`` as redis-py returns it raw (``[first, last, [host, port, id], ...]``)
    -> (first, last, "host:port" of the primary)."""
    return [(int(entry[0]), int(entry[1]), f"{_text(entry[2][0])}:{int(entry[2][1])}") for entry in cluster_slots]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
