"""The baseline relay: the Python ceiling for Tether's wire protocol on this machine.

    python -m bench.relay --port N [--host 127.0.0.1] [--tls-cert PEM --tls-key PEM]

A bare asyncio server speaking the same framing with the same codec: `register` gets a
`registered` with fake ids, `subscribe` an `ok`, each `publish` goes to every subscriber of
its topic as a `deliver` (a per-subscriber seq), `ping` gets `pong`, `ack` is ignored. No
sessions, no actors, no queues, no flow control, no guarantees: what is left is the cost of
decoding, encoding and the socket calls, which any broker in Python pays too. With a
certificate it serves TLS through asyncio's own TLS layer, as the broker does: the floor under
the broker's TLS figures (`scripts/bench --tls`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import socket
import ssl
from typing import Any

from tether.protocol import (
    CLIENT_FRAME_TYPES,
    DEFAULT_MAX_FRAME,
    Ack,
    BadRequest,
    Error,
    Frame,
    FrameDecoder,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Registered,
    Stats,
    Subscribe,
    Unregister,
    Unsubscribe,
    encode,
    encode_delivers,
)

_ids = itertools.count(1)


class Relay:
    """The relay's only shared state: who listens to what."""

    def __init__(self) -> None:
        self.topics: dict[str, set[RelayConnection]] = {}


class RelayConnection(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME, accept=CLIENT_FRAME_TYPES)
        self.seqs: dict[str, int] = {}
        # Output collected during one data_received and written once: one syscall per read.
        self.out: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        for topic in self.seqs:
            subs = self.relay.topics.get(topic)
            if subs is not None:
                subs.discard(self)
                if not subs:
                    del self.relay.topics[topic]
        self.transport = None

    def data_received(self, data: bytes) -> None:
        decoder = self.decoder
        decoder.receive_data(data)
        # drain(): the whole read decoded in one pass, as the broker does.
        items, fatal = decoder.drain()
        topics = self.relay.topics
        out = self.out
        touched: set[RelayConnection] = {self}
        # Consecutive publishes to one topic are relayed as a run, encoded with the batch
        # encoder the broker uses, so that the relay stays the ceiling it claims to be.
        run_topic = ""  # never a topic (they have 1 to 256 characters)
        run: list[bytes] = []
        for frame in items:
            # Most frequent first: this chain is the relay's whole hot path.
            if type(frame) is Publish:
                if frame.topic != run_topic:
                    if run:
                        touched.update(_relay_run(topics, run_topic, run))
                    run_topic, run = frame.topic, []
                run.append(frame.payload)
                if frame.req is not None:
                    out.append(encode(Ok(req=frame.req)))
            elif type(frame) is Ack:
                pass
            else:
                if run:
                    touched.update(_relay_run(topics, run_topic, run))
                    run_topic, run = "", []
                self._control(frame)
        if run:
            touched.update(_relay_run(topics, run_topic, run))
        if fatal is not None:
            out.append(encode(Error(code=str(fatal.code), message=fatal.message)))
        self._flush(touched)
        if fatal is not None and self.transport is not None:
            self.transport.close()

    def _control(self, frame: Frame | BadRequest) -> None:
        out = self.out
        topics = self.relay.topics
        if isinstance(frame, BadRequest):
            out.append(encode(Error(req=frame.req, code=str(frame.code), message=frame.message)))
        elif isinstance(frame, Subscribe):
            self.seqs.setdefault(frame.topic, 0)
            topics.setdefault(frame.topic, set()).add(self)
            out.append(encode(Ok(req=frame.req)))
        elif isinstance(frame, Unsubscribe):
            topics.get(frame.topic, set()).discard(self)
            out.append(encode(Ok(req=frame.req)))
        elif isinstance(frame, Ping):
            out.append(encode(Pong(req=frame.req)))
        elif isinstance(frame, Register):
            out.append(self._registered(frame))
        elif isinstance(frame, (Unregister, Stats)):  # nothing behind them here
            out.append(encode(Ok(req=frame.req)))

    @staticmethod
    def _registered(frame: Register) -> bytes:
        n = next(_ids)
        return encode(
            Registered(
                req=frame.req,
                session_id=f"relay-{n}",
                resume_token=f"token-{n}",
                resumed=False,
                keepalive=frame.keepalive,
                expiry=0,
                queued=0,
                dropped=0,
            )
        )

    @staticmethod
    def _flush(touched: set[RelayConnection]) -> None:
        for conn in touched:
            if conn.out:
                if conn.transport is not None:
                    conn.transport.write(b"".join(conn.out))
                conn.out.clear()


def _relay_run(
    topics: dict[str, set[RelayConnection]], topic: str, payloads: list[bytes]
) -> set[RelayConnection]:
    """Queue `deliver`s of `payloads` to every subscriber of `topic`; returns them."""
    subs = topics.get(topic, set())
    for sub in subs:
        first = sub.seqs[topic] + 1
        sub.seqs[topic] = first + len(payloads) - 1
        entries = list(zip(itertools.count(first), payloads, strict=False))
        sub.out.extend(encode_delivers(topic, entries))
    return subs


async def serve(host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
    relay = Relay()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RelayConnection(relay), host, port, backlog=4096, reuse_address=True, ssl=tls
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert", default=None, help="serve TLS with this PEM certificate")
    parser.add_argument("--tls-key", default=None, help="the certificate's PEM key")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        # The server defaults of the ssl module, as `tether serve --tls-cert` uses.
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    asyncio.run(serve(args.host, args.port, tls))


if __name__ == "__main__":
    main()
