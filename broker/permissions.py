"""Per-user topic permissions: MQTT topic filters, compiled once per session.

Pattern syntax (a user's `publish` and `subscribe` lists in the users file): levels are split by
`/`; a level `+` matches exactly one level (which may be empty), a last level `#` matches the
rest (zero or more levels: `a/#` matches `a`, `a/b` and `a/b/c`). `{username}` and
`{client_id}` are placeholders, each a whole level, replaced by the session's user name or
client id. A placeholder that is only part of a level (`dev-{client_id}`) is refused by
`validate_pattern`: a partial match would let a crafted id pick which topics match.

Theory of operation: a placeholder matches literally. A value that is empty or holds `/`, `+`
or `#` would change the pattern's shape (a client id `a/#` would turn `devices/{client_id}`
into a wildcard), so such a value never matches: the patterns using it are dropped for that
session, never widened. `+` and `#` at the first level do not match a topic starting with `$`
(MQTT's rule: `#` is not a grant to the broker's own topics).

`compile_grants(...)` turns a user's lists, for one session, into a `TopicMatcher`: exact
topics in a set, wildcard patterns in a trie of levels, and a small cache of recent answers,
so that the publish path costs a dict lookup. No lists: every topic (unless `default_deny`,
then none); an empty list: nothing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALLOW_ALL",
    "CLIENT_ID",
    "DENY_ALL",
    "MAX_PATTERN_CHARS",
    "USERNAME",
    "PatternError",
    "TopicMatcher",
    "compile_grants",
    "validate_pattern",
]

USERNAME = "{username}"
CLIENT_ID = "{client_id}"
_PLACEHOLDERS = (USERNAME, CLIENT_ID)
# A topic is at most 256 code points; a pattern with placeholders may be a little longer.
MAX_PATTERN_CHARS = 1024
CACHE_SIZE = 1024  # answers kept per matcher and action; cleared when full


class PatternError(ValueError):
    """A topic pattern that is not valid (said in one line, naming the pattern)."""


def validate_pattern(pattern: object) -> None:
    """Raise `PatternError` unless `pattern` is a valid topic pattern (module docstring)."""
    if not isinstance(pattern, str) or not 1 <= len(pattern) <= MAX_PATTERN_CHARS:
        raise PatternError(
            f"a topic pattern must be a string of 1 to {MAX_PATTERN_CHARS} characters, "
            f"got {pattern!r}"
        )
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in pattern):
        raise PatternError(f"topic pattern {pattern!r} holds control characters")
    levels = pattern.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            if index != len(levels) - 1:
                raise PatternError(f"topic pattern {pattern!r}: '#' may only be the last level")
            continue
        if level in ("+", *_PLACEHOLDERS):
            continue
        if "#" in level or "+" in level:
            raise PatternError(
                f"topic pattern {pattern!r}: '+' and '#' must be a whole level "
                f"(got level {level!r})"
            )
        if "{" in level or "}" in level:
            if any(p in level for p in _PLACEHOLDERS):
                raise PatternError(
                    f"topic pattern {pattern!r}: a placeholder must be a whole level "
                    f"(got level {level!r}; write e.g. 'devices/{{client_id}}/#')"
                )
            raise PatternError(
                f"topic pattern {pattern!r}: unknown placeholder in level {level!r} "
                "(known: {username}, {client_id}; braces are reserved for them)"
            )


def _literal(value: str) -> bool:
    """May `value` stand in for a placeholder level? (Never empty, never a separator or a
    wildcard: those would change the pattern's shape.)"""
    return bool(value) and "/" not in value and "+" not in value and "#" not in value


class _Node:
    __slots__ = ("children", "end", "plus", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.rest = False  # a `#` at this level: matches here and everything below
        self.end = False  # a pattern ends here


def _insert(root: _Node, levels: Sequence[str]) -> None:
    node = root
    for level in levels:
        if level == "#":
            node.rest = True
            return
        if level == "+":
            if node.plus is None:
                node.plus = _Node()
            node = node.plus
        else:
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
    node.end = True


def _walk(node: _Node, levels: list[str], index: int) -> bool:
    if node.rest:
        return True
    if index == len(levels):
        return node.end
    child = node.children.get(levels[index])
    if child is not None and _walk(child, levels, index + 1):
        return True
    return node.plus is not None and _walk(node.plus, levels, index + 1)


class _Set:
    """One list's compiled form: None patterns (no list) allow everything."""

    __slots__ = ("_cache", "_exact", "_root", "_wild")

    def __init__(self, patterns: Iterable[Sequence[str]]) -> None:
        self._exact: set[str] = set()
        self._root = _Node()
        self._wild = False
        for levels in patterns:
            if "+" in levels or "#" in levels:
                _insert(self._root, levels)
                self._wild = True
            else:
                self._exact.add("/".join(levels))
        self._cache: dict[str, bool] = {}

    def allows(self, topic: str) -> bool:
        answer = self._cache.get(topic)
        if answer is None:
            answer = self._match(topic)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[topic] = answer
        return answer

    def _match(self, topic: str) -> bool:
        if topic in self._exact:
            return True
        if not self._wild:
            return False
        levels = topic.split("/")
        root = self._root
        if topic.startswith("$"):
            # Only a literal first level may match a `$` topic.
            child = root.children.get(levels[0])
            return child is not None and _walk(child, levels, 1)
        return _walk(root, levels, 0)


@dataclass(frozen=True, slots=True)
class TopicMatcher:
    """One session's permissions. `publish` / `subscribe` None: every topic."""

    publish: _Set | None
    subscribe: _Set | None

    def may_publish(self, topic: str) -> bool:
        allowed = self.publish
        return allowed is None or allowed.allows(topic)

    def may_subscribe(self, topic: str) -> bool:
        allowed = self.subscribe
        return allowed is None or allowed.allows(topic)

    @property
    def unrestricted(self) -> bool:
        return self.publish is None and self.subscribe is None


ALLOW_ALL = TopicMatcher(None, None)
DENY_ALL = TopicMatcher(_Set(()), _Set(()))


def _expand(pattern: str, username: str, client_id: str) -> list[str] | None:
    """The pattern's levels with the placeholders replaced; None when a value may not stand
    for a level (the pattern then matches nothing for this session)."""
    levels = pattern.split("/")
    for index, level in enumerate(levels):
        if level == USERNAME:
            if not _literal(username):
                return None
            levels[index] = username
        elif level == CLIENT_ID:
            if not _literal(client_id):
                return None
            levels[index] = client_id
    return levels


def _compile(patterns: Sequence[str] | None, username: str, client_id: str) -> _Set | None:
    if patterns is None:
        return None
    expanded = (_expand(p, username, client_id) for p in patterns)
    return _Set(levels for levels in expanded if levels is not None)


def compile_grants(
    publish: Sequence[str] | None,
    subscribe: Sequence[str] | None,
    *,
    username: str,
    client_id: str,
    default_deny: bool = False,
) -> TopicMatcher:
    """The matcher for one session of `username` as `client_id`. A list that is None is no
    restriction, unless `default_deny` (then it allows nothing). Patterns are assumed valid
    (`validate_pattern`, checked when the users file is read)."""
    if default_deny:
        publish = () if publish is None else publish
        subscribe = () if subscribe is None else subscribe
    if publish is None and subscribe is None:
        return ALLOW_ALL
    return TopicMatcher(
        _compile(publish, username, client_id), _compile(subscribe, username, client_id)
    )
