"""Frames to and from msgpack maps: `to_wire` in class field order with defaults omitted,
`from_wire` with a fast path for `publish`, the one frame per message."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import BadRequest, LocalProtocolError
from .frames import _BROKER_CLASSES, _CLIENT_CLASSES, Deliver, Frame, Publish

__all__ = ["from_wire", "to_wire"]

_KEEP = object()

# Per class: (field name, value that means "omit this key", required on decode).
# Precomputed so to_wire/from_wire do no dataclass introspection per frame.
_SPECS: dict[type, tuple[tuple[str, object, bool], ...]] = {}
for _cls in (*_CLIENT_CLASSES, *_BROKER_CLASSES):
    _spec = []
    for _f in dataclasses.fields(_cls):
        _required = _f.default is dataclasses.MISSING and _f.default_factory is dataclasses.MISSING
        _omit: object = None if _f.default is None else _KEEP
        _spec.append((_f.name, _omit, _required))
    _SPECS[_cls] = tuple(_spec)
# `redelivered` is only sent when True, keeping the common deliver frame small.
_SPECS[Deliver] = tuple((n, False if n == "redelivered" else o, r) for n, o, r in _SPECS[Deliver])
del _cls, _spec, _f, _required, _omit


def to_wire(frame: Frame) -> dict[str, Any]:
    """The msgpack map for `frame`: "type" first, then fields in class order, minus omitted."""
    try:
        spec = _SPECS[frame.__class__]
    except KeyError:
        raise TypeError(f"not a frame: {frame!r}") from None
    m: dict[str, Any] = {"type": frame.type}
    for name, omit, _ in spec:
        v = getattr(frame, name)
        if v is not omit:
            m[name] = v
    return m


def from_wire(m: dict[str, Any], *, accept: Mapping[str, type]) -> Frame:
    """Build the frame described by map `m` if its type is in `accept`.

    Raises `BadRequest` (carrying `req` when `m` has an int `req`) for an unknown type,
    a missing field or an invalid value. Keys not part of the frame are ignored.
    """
    ftype = m.get("type")
    if ftype == "publish" and accept.get("publish") is Publish:
        # The hot path: one frame of this kind per message, so no generic field walk.
        topic, payload, preq = m.get("topic"), m.get("payload"), m.get("req")
        if topic is not None and payload is not None:
            try:
                return Publish(topic=topic, payload=payload, req=preq)
            except LocalProtocolError as e:
                req = preq if preq.__class__ is int else None
                raise BadRequest(str(e), req=req, frame_type=ftype, field=e.field) from None
    req = m.get("req")
    if req.__class__ is not int:
        req = None
    cls = accept.get(ftype) if isinstance(ftype, str) else None
    if cls is None:
        raise BadRequest(
            f"unknown frame type {ftype!r}",
            req=req,
            frame_type=ftype if isinstance(ftype, str) else None,
            field="type",
        )
    spec = _SPECS.get(cls)
    if spec is None:
        raise TypeError(f"accept maps {ftype!r} to {cls!r}, which is not a frame class")
    kwargs = {}
    for name, omit, required in spec:
        if name in m:
            v = m[name]
            # An explicit nil for an optional field means the same as leaving it out.
            if v is not None or omit is not None:
                kwargs[name] = v
        elif required:
            raise BadRequest(f"{ftype}.{name} is missing", req=req, frame_type=ftype, field=name)
    try:
        frame: Frame = cls(**kwargs)
    except LocalProtocolError as e:
        raise BadRequest(str(e), req=req, frame_type=ftype, field=e.field) from None
    return frame
