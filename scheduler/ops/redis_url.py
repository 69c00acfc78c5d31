"""Redis URLs, and the synchronous redis-py client each one names.

- ``redis://[[user]:password@]host:port[/db]``, ``rediss://...`` (TLS), ``unix:///path.sock``:
  one server, handed to redis-py's ``Redis.from_url`` as they are (a Cluster node's URL is
  detected later, by the adapter).
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` (or
  ``rediss+sentinel://`` for TLS to the data servers): the primary of ``service`` as Redis
  Sentinel names it. redis-py's ``Sentinel`` asks the sentinels, in turn, where the primary
  is each time a connection is made; after a failover the old connections fail (or the
  demoted primary answers READONLY, which redis-py turns into a reconnect), and the next
  ones go to the promoted replica. The credentials are the data servers'; sentinels are
  asked without a password unless the query says ``?sentinel_auth=1`` (then the same ones).

:func:`parse_sentinel` checks a Sentinel URL (the error never shows the password);
:func:`scheduler.ops.redis_client.client` makes the client. (No redis import here: the
settings use this module, and the session core, which reads the settings, imports no I/O.)
"""

from __future__ import annotations

import urllib.parse

import attrs

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""Sentinel URL schemes, and whether each speaks TLS to the data servers."""
DEFAULT_SENTINEL_PORT = 26379
_TRUE = ("1", "true", "yes", "on")


class RedisURLError(ValueError):
    """A Redis URL that cannot be used; the message never holds its password."""


@attrs.frozen
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    sentinel_auth: bool = False


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel(url: str) -> SentinelURL:
    """The parts of a Sentinel URL; :class:`RedisURLError` says what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise RedisURLError(f"not a Sentinel URL (scheme {scheme!r}; expected redis+sentinel://)")
    credentials, _, location = rest.rpartition("@")
    location, _, query = location.partition("?")
    hosts, _, path = location.partition("/")
    username, _, password = credentials.partition(":")
    sentinels = tuple(_host_port(h) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise RedisURLError("a Sentinel URL names at least one sentinel: redis+sentinel://host:26379[,host:26379]/service")
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise RedisURLError("a Sentinel URL names the service after the hosts: redis+sentinel://host:26379/service")
    if db and not db.isdigit():
        raise RedisURLError(f"the database after the service must be a number (got {db!r})")
    options = urllib.parse.parse_qs(query)
    unknown = sorted(set(options) - {"sentinel_auth"})
    if unknown:
        raise RedisURLError(f"unknown Sentinel URL option(s) {', '.join(unknown)} (known: sentinel_auth)")
    return SentinelURL(
        sentinels=sentinels, service=urllib.parse.unquote(service), db=int(db or 0),
        username=urllib.parse.unquote(username) or None, password=urllib.parse.unquote(password) or None,
        ssl=SENTINEL_SCHEMES[scheme.lower()],
        sentinel_auth=options.get("sentinel_auth", ["0"])[-1].lower() in _TRUE,
    )


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        return text.strip(), DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisURLError(f"sentinel {host!r}: port must be a number 1-65535 (got {port!r})")
    return host.strip("[]"), int(port)
