"""Secrets (tokens, API keys, the Redis URL's password): where they come from, how they are
compared, and how they are shown.

Sources, for each of :data:`SECRETS`: the setting itself (flag, ``SCHEDULER_*`` variable,
config file), or a file named by ``<name>_file`` (``--node-token-file``), or a systemd
credential of the same name (``LoadCredential=node_token:...`` in the unit puts it under
``$CREDENTIALS_DIRECTORY``). A file or credential keeps the secret off the command line that
``ps`` shows and out of the unit file. Giving both the setting and its file is an error.

Several tokens may be given comma-separated (``--node-token new,old``), so that a token is
rotated without restarting every node at once: :func:`matches` accepts any of them, in time
that does not depend on which one (or how much of one) matched.

Shown: a URL with its password as ``***`` (:func:`redacted`), every other secret as ``***``.
"""

from __future__ import annotations

import hmac
import os
import urllib.parse
from collections.abc import Mapping

SECRETS = ("node_token", "admin_token", "client_api_keys", "redis_url")
"""Settings that hold a secret; each may come from ``<name>_file`` or a systemd credential."""
HIDDEN = "***"


class SecretError(ValueError):
    """A secret file or credential could not be read (the message names the setting)."""


def tokens(value: str | None) -> list[str]:
    """The comma-separated tokens of a setting (empty entries dropped)."""
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def matches(presented: str | None, accepted: list[str]) -> bool:
    """Whether ``presented`` is one of ``accepted``: every one is compared, in constant time."""
    given = (presented or "").encode()
    found = False
    for token in accepted:
        found |= hmac.compare_digest(given, token.encode())
    return found


def read_file(name: str, path: str) -> str:
    """A secret from a file: its content without the trailing newline."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except OSError as exc:
        raise SecretError(f"{name}_file: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"{name}_file: {path!r} is not UTF-8 text") from None
    if not value.strip():
        raise SecretError(f"{name}_file: {path!r} is empty")
    return value


def credential(name: str, environ: Mapping[str, str]) -> str | None:
    """The systemd credential ``name`` (``$CREDENTIALS_DIRECTORY/name``), if there is one."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = os.path.join(directory, name)
    return read_file(name, path) if os.path.isfile(path) else None


def redacted(url: str) -> str:
    """A URL with its password replaced by ``***`` (also inside a comma-separated host list)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:{HIDDEN}@{host}"))
