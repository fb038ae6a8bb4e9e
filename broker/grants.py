"""Topic permissions on the data path: each session's matcher, refusals, and subscriptions a
changed users file no longer allows. Owned by the SubscriberManager and run on its thread.

Theory of operation: a session's matcher (`SessionSubs.perms`, broker/permissions.py) is
compiled from the users file at every attach (fresh, resume, after a restart) and, for the
sessions of users whose lists changed, at every reload of the file. `$sys/...` topics are
not governed by the lists: the admin mark alone decides (sysevents.py).

A subscription the new matcher does not allow is ended as by an `unsubscribe` (its queue
discarded, in memory and in the store; its seq counter kept). A connected client is told
once per topic: `error` `not_authorized`, no `req`, with `topic`. An away session is told the
same frames right after its next `registered`; the notices wait in memory only, so a broker
restart in between loses them (the subscriptions are gone all the same, and a restart
checks the restored ones against the users file too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog

from tether.broker.fanout import Fanout, SessionSubs
from tether.broker.journal import Journal, Pending
from tether.broker.permissions import ALLOW_ALL, DENY_ALL, TopicMatcher, compile_grants
from tether.broker.store import StoreOp
from tether.broker.store import Unsubscribe as StoreUnsubscribe
from tether.broker.sysevents import SYS_PREFIX
from tether.broker.users import UserRecord, UserStore
from tether.protocol import Error, ErrorCode, encode

__all__ = ["Grants", "refused", "revoke_disallowed", "revoked_frames"]

_log = structlog.get_logger("tether.subscribers")

# As the Listener's ECHO_LIMIT: an error never quotes more of what the client sent.
_QUOTE_LIMIT = 200


def _quoted(topic: str) -> str:
    text = repr(topic)
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 3] + "..."


def refused(req: int | None, action: str, topic: str) -> Error:
    """The answer to a `publish` or `subscribe` outside the user's lists. `action`: "publish
    to" or "subscribe to". No `topic` field: that marks a revoked subscription only."""
    return Error(
        req=req,
        code=ErrorCode.NOT_AUTHORIZED,
        message=f"this user may not {action} topic {_quoted(topic)}",
    )


def revoked_frames(topics: Iterable[str]) -> bytes:
    """One `error` per subscription ended by a permissions change (docs/protocol.md 7.1)."""
    return b"".join(
        encode(
            Error(
                code=ErrorCode.NOT_AUTHORIZED,
                message="the subscription was ended: this user may no longer subscribe to "
                f"topic {_quoted(topic)}",
                topic=topic,
            )
        )
        for topic in topics
    )


def revoke_disallowed(subs: SessionSubs, fanout: Fanout, journal: Journal | None) -> list[str]:
    """End `subs`' subscriptions its matcher does not allow (not `$sys/...`); their topics."""
    perms = subs.perms
    if perms.subscribe is None:
        return []
    gone = [
        topic
        for topic in subs.queues
        if not topic.startswith(SYS_PREFIX) and not perms.may_subscribe(topic)
    ]
    if not gone:
        return gone
    for topic in gone:
        fanout.unsubscribe(subs, topic)
    if journal is not None:
        ops: list[StoreOp] = [StoreUnsubscribe(subs.session_id, topic) for topic in gone]
        journal.submit(ops, Pending(None, []))
    _log.info(
        "subscriptions_revoked",
        session_id=subs.session_id,
        client_id=subs.client_id,
        username=subs.username,
        topics=gone,
        connected=subs.conn is not None,
    )
    return gone


def _lists(record: UserRecord | None) -> tuple[object, object] | None:
    return None if record is None else (record.publish, record.subscribe)


class Grants:
    """The users file's lists and `--default-deny`, turned into each session's matcher.
    `users` None (a broker built without a users file, in tests): every session may use
    every topic, unless `default_deny`."""

    __slots__ = ("_default_deny", "_users", "open")

    def __init__(self, users: UserStore | None, default_deny: bool) -> None:
        self._users = users
        self._default_deny = default_deny
        self.open = False
        self._set_open()

    def _set_open(self) -> None:
        # Nobody is restricted: a publish from a session already gone is let through as ever.
        users = self._users
        self.open = not self._default_deny and (
            users is None
            or all(r.publish is None and r.subscribe is None for r in users.records().values())
        )

    def matcher(self, username: str, client_id: str) -> TopicMatcher:
        """The matcher for a session attaching now; a user not in the file may use nothing
        (its session is being ended)."""
        if self._users is None:
            return DENY_ALL if self._default_deny else ALLOW_ALL
        record = self._users.get(username)
        if record is None:
            return DENY_ALL
        return compile_grants(
            record.publish,
            record.subscribe,
            username=username,
            client_id=client_id,
            default_deny=self._default_deny,
        )

    def known(self, username: str) -> bool:
        return self._users is None or username in self._users

    def orphan(self) -> TopicMatcher:
        """For a publish whose session is gone (ended while its frames were on the way)."""
        return ALLOW_ALL if self.open else DENY_ALL

    def reload(self, users: UserStore) -> set[str]:
        """Take the new users file; returns the users whose lists changed (sessions of users
        no longer in it are left alone: the SessionManager ends them)."""
        old = self._users
        self._users = users
        self._set_open()
        before: Mapping[str, UserRecord] = old.records() if old is not None else {}
        return {
            name
            for name, record in users.records().items()
            if old is None or _lists(before.get(name)) != _lists(record)
        }
