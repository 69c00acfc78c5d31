"""16 threads dispatching, completing, cancelling and moving jobs at once on shared nodes.

Each script is atomic, so whatever the interleaving the slot accounting must stay exact:
per node, current_jobs == its job set == its dispatched jobs, never above max_jobs; the
leases set holds exactly the dispatched jobs; one job per key. At the end every slot is free.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import redis

from scheduler.store import keys, lua
from scheduler.store.redis_adapter import connect, load_script_sources

NODES = {f"n{i}": 3 for i in range(4)}

# Read-only and atomic: for every node, current_jobs must equal its job set and stay within max_jobs.
# KEYS: the runtime table, then per node its job set and info; ARGV: the node ids.
CONSISTENT = """
for i = 1, #ARGV do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i] .. ':current_jobs') or '0')
  local held = redis.call('SCARD', KEYS[2 * i])
  local max_jobs = tonumber(redis.call('HGET', KEYS[2 * i + 1], 'max_jobs'))
  if current ~= held or current < 0 or current > max_jobs then
    return {ARGV[i], current, held, max_jobs}
  end
end
return 'ok'
"""


def call(client, scripts, c):
    name, keys_, args = c
    try:
        return scripts[name](keys=keys_, args=args)
    except redis.exceptions.ResponseError as exc:
        return ["ERR", str(exc).split(" ", 1)[0]]


@pytest.mark.parametrize("backend", ["single", "cluster"])
def test_sixteen_threads_keep_slots_exact(backend, request):
    redis_url = request.getfixturevalue("flushed_cluster_url" if backend == "cluster" else "flushed_single_url")
    setup = connect(redis_url, decode_responses=True)
    scripts = {name: setup.register_script(src) for name, src in load_script_sources().items()}
    now = int(time.time() * 1000)
    for node, max_jobs in NODES.items():
        call(setup, scripts, lua.register_node(node, [("zh-en", "zh", "en")], max_jobs, now, "storm"))
    candidates = lua.read_candidates(setup, "zh", "en")
    errors: list[BaseException] = []
    stats = {"placed": 0, "full": 0, "completed": 0, "cancelled": 0, "moved": 0, "refused": 0}
    lock = threading.Lock()

    def worker(w: int) -> None:
        client = connect(redis_url, decode_responses=True)
        mine = {name: client.register_script(src) for name, src in load_script_sources().items()}
        rng = random.Random(w)
        held: list[list] = []  # [job_id, node, attempt, job_key]
        try:
            for k in range(150):
                op = rng.random()
                if op < 0.45 or not held:
                    job_key = f"w{w}:{k}:translate:en"
                    reply = call(client, mine, lua.dispatch(job_key, f"w{w}.{k}", f"w{w}", k, "zh", "en", "t", "none",
                                                            int(time.time() * 1000), 30_000, 60_000, rng.getrandbits(20),
                                                            candidates))
                    with lock:
                        if reply[0] == "OK":
                            held.append([str(reply[1]), reply[2], 1, job_key])
                            stats["placed"] += 1
                        else:
                            assert reply[1] == "NO_AVAILABLE_NODE", reply
                            stats["full"] += 1
                    continue
                job = held[rng.randrange(len(held))]
                if op < 0.75:
                    wrong = rng.random() < 0.2
                    node = next(n for n in NODES if n != job[1]) if wrong else job[1]
                    reply = call(client, mine, lua.complete(job[0], job[3], node, job[2], True, int(time.time() * 1000)))
                    if wrong:
                        assert reply == ["ERR", "NODE_MISMATCH"], reply
                        stats["refused"] += 1
                    else:
                        assert reply[0] == "OK", reply
                        held.remove(job)
                        stats["completed"] += 1
                elif op < 0.9:
                    reply = call(client, mine, lua.redispatch(job[0], job[1], job[2], f"w{w}", "t", "zh", "en",
                                                              int(time.time() * 1000), 30_000, 60_000, rng.getrandbits(20),
                                                              candidates))
                    if reply[0] == "OK":
                        job[1], job[2] = reply[2], reply[3]
                        stats["moved"] += 1
                    else:  # no other node free: the job waits; cancel it to keep going
                        assert reply == ["ERR", "NO_AVAILABLE_NODE"], reply
                        assert call(client, mine, lua.cancel(job[0], job[3], job[1], 0))[0] == "OK"
                        held.remove(job)
                        stats["cancelled"] += 1
                else:
                    assert call(client, mine, lua.cancel(job[0], job[3], job[1], 0)) == ["OK", job[1], job[2]]
                    held.remove(job)
                    stats["cancelled"] += 1
            for job in held:
                assert call(client, mine, lua.complete(job[0], job[3], job[1], job[2], True, 0))[0] == "OK"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            client.close()

    done = threading.Event()
    samples = []

    def checker() -> None:
        client = connect(redis_url, decode_responses=True)
        node_keys = [keys.nodes_runtime()] + [k for n in NODES for k in (keys.node_jobs(n), keys.node_info(n))]
        while not done.is_set():
            samples.append(client.eval(CONSISTENT, len(node_keys), *node_keys, *NODES))
        client.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    watcher = threading.Thread(target=checker)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    watcher.join(timeout=10)
    assert not errors, errors[0]
    assert len(samples) > 10 and all(s == "ok" for s in samples), [s for s in samples if s != "ok"][:3]
    for node in NODES:
        assert setup.hget(keys.nodes_runtime(), keys.runtime_field(node, "current_jobs")) == "0", node
        assert setup.scard(keys.node_jobs(node)) == 0
    assert setup.zcard(keys.leases()) == 0
    assert stats["placed"] > 500 and stats["full"] > 0 and stats["moved"] > 0, stats
    setup.close()
