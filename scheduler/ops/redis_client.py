"""The synchronous redis-py client a Redis URL names (:mod:`scheduler.ops.redis_url`)."""

from __future__ import annotations

from typing import Any

import redis
from redis.sentinel import Sentinel

from scheduler.ops.redis_url import is_sentinel, parse_sentinel


def client(url: str, **options: Any) -> Any:
    """A redis-py ``Redis`` for ``url``: from the URL itself, or the primary Sentinel names."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel(url)
    auth = {"username": target.username, "password": target.password}
    sentinel_options = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout") if k in options}
    if target.sentinel_auth:
        sentinel_options |= auth
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
    return sentinel.master_for(target.service, db=target.db, ssl=target.ssl, **auth, **options)
