"""Which local subscription gets a message: shared by both front ends, no I/O, no locking.

A resumed session may deliver on topics this process has not subscribed to yet (it was
restarted, and the application subscribes after connecting). Those messages are held, not
acked, until the application subscribes to the topic, and then handed to it first, in order.
Messages on a topic the application unsubscribed are dropped (and may be acked).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from .events import Message

__all__ = ["Router"]

S = TypeVar("S")


class Router(Generic[S]):
    def __init__(self) -> None:
        self._subs: dict[str, S] = {}
        self._cancelled: set[str] = set()
        self._unclaimed: dict[str, deque[Message]] = {}

    def get(self, topic: str) -> S | None:
        return self._subs.get(topic)

    def add(self, topic: str, sub: S) -> list[Message]:
        """Route `topic` to `sub`; returns the held messages it must get first."""
        self._subs[topic] = sub
        self._cancelled.discard(topic)
        return list(self._unclaimed.pop(topic, ()))

    def remove(self, topic: str) -> S | None:
        self._cancelled.add(topic)
        self._unclaimed.pop(topic, None)
        return self._subs.pop(topic, None)

    def route(self, message: Message) -> tuple[S | None, bool]:
        """(subscription, False), or (None, True): drop it, or (None, False): held."""
        sub = self._subs.get(message.topic)
        if sub is not None:
            return sub, False
        if message.topic in self._cancelled:
            return None, True
        self._unclaimed.setdefault(message.topic, deque()).append(message)
        return None, False

    def subscriptions(self) -> list[S]:
        return list(self._subs.values())
