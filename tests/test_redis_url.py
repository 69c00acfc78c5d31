"""Sentinel URLs: parsed, checked at configuration time, never shown with their password."""

from __future__ import annotations

import pytest

from scheduler.ops import redis_url
from scheduler.ops.config import ConfigError, Settings


def test_a_sentinel_url_names_its_sentinels_service_db_and_credentials():
    target = redis_url.parse_sentinel("redis+sentinel://app:p%40ss@h1:26380,h2,[::1]:26379/cache/2?sentinel_auth=1")
    assert target.sentinels == (("h1", 26380), ("h2", 26379), ("::1", 26379))
    assert (target.service, target.db, target.username, target.password) == ("cache", 2, "app", "p@ss")
    assert target.sentinel_auth and not target.ssl
    assert redis_url.parse_sentinel("rediss+sentinel://h:1/s").ssl
    assert not redis_url.is_sentinel("redis://h:6379/0") and redis_url.is_sentinel("REDIS+SENTINEL://h/s")


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://:secret@h1:26379", "names the service"),
    ("redis+sentinel://:secret@/svc", "at least one sentinel"),
    ("redis+sentinel://:secret@h1:port/svc", "port must be a number"),
    ("redis+sentinel://:secret@h1/svc/zero", "must be a number"),
    ("redis+sentinel://:secret@h1/svc?password=x", "unknown Sentinel URL option"),
])
def test_a_bad_sentinel_url_stops_the_start_without_showing_its_password(url, says):
    with pytest.raises(ConfigError) as refused:
        Settings(redis_url=url)
    assert says in str(refused.value) and "secret" not in str(refused.value)


def test_waiting_for_replicas_needs_a_redis_of_ones_own():
    with pytest.raises(ConfigError, match="embedded Valkey has no replicas"):
        Settings(redis_wait_replicas=1)
    assert Settings(redis_url="redis+sentinel://h/s", redis_wait_replicas=1).redis_wait_timeout_ms == 1000
