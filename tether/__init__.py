"""Tether, an actor-based TCP session broker. An installed Tether has this one import name:
`tether.protocol` (the wire format), `tether.broker` and `tether.client` (docs/architecture.md)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
