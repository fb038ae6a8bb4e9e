"""What TLS itself costs per message, apart from any socket or event loop: a micro-bench.

    python -m bench.tls_micro

A client and a server `ssl.SSLObject` joined by memory BIOs (no sockets, one thread) after a
real handshake with a bench certificate (EC P-256, TLS 1.3 as the ssl module's defaults
negotiate it). Timed: a TLS handshake, both ends' CPU; and for a batch of N publish-sized
frames (a 64-byte payload, as the bench sends), encrypting it at one end and decrypting it at
the other. `scripts/bench --tls` sets these beside the broker's CPU per message with and
without TLS: the difference the crypto does not explain is asyncio's TLS layer (its Python
code per read and write, and reads cut at TLS records of 16 KiB).
"""

from __future__ import annotations

import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import ServerTls
from bench.loadgen import PublishEncoder

FRAME_BYTES = len(PublishEncoder("bench/t", 64).frame(0, 1))
BATCHES = (1, 10, 100, 1000)  # frames per write: one message; a socket read's worth


@dataclass(frozen=True)
class MicroResult:
    cipher: str
    version: str
    handshake_ms: float  # both ends' CPU for one full handshake
    frame_bytes: int
    ns_per_message: dict[int, float]  # batch size -> encrypt + decrypt, per frame
    mb_per_s: dict[int, float]  # batch size -> plaintext MB/s through encrypt + decrypt

    def to_dict(self) -> dict[str, object]:
        return {
            "cipher": self.cipher,
            "version": self.version,
            "handshake_ms": round(self.handshake_ms, 3),
            "frame_bytes": self.frame_bytes,
            "ns_per_message": {str(k): round(v) for k, v in self.ns_per_message.items()},
            "mb_per_s": {str(k): round(v, 1) for k, v in self.mb_per_s.items()},
        }


class _Pair:
    """A client and a server SSLObject wired back to back through memory BIOs."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.s_in, self.s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def handshake(self) -> None:
        done = {"client": False, "server": False}
        for _ in range(20):  # TLS 1.3 needs two flights each way; a bound, never a hang
            for name, obj in (("client", self.client), ("server", self.server)):
                if not done[name]:
                    try:
                        obj.do_handshake()
                        done[name] = True
                    except ssl.SSLWantReadError:
                        pass
                self._shuttle()
            if all(done.values()):
                return
        raise RuntimeError("the in-memory TLS handshake did not finish")

    def _shuttle(self) -> None:
        if self.c_out.pending:
            self.s_in.write(self.c_out.read())
        if self.s_out.pending:
            self.c_in.write(self.s_out.read())

    def send(self, data: bytes) -> bytes:
        """Client encrypts `data`, server decrypts it; returns what the server read."""
        self.client.write(data)
        self.s_in.write(self.c_out.read())
        out = []
        while True:
            try:
                out.append(self.server.read(1 << 20))
            except ssl.SSLWantReadError:
                return b"".join(out)


def _contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    tls = ServerTls.make(directory)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls.cert, tls.key)
    client = ssl.create_default_context(cafile=str(tls.client.ca))
    return server, client


def measure(budget_s: float = 0.3) -> MicroResult:
    """About `budget_s` of CPU per batch size, and a few handshakes."""
    with tempfile.TemporaryDirectory(prefix="tether-tls-micro-") as tmp:
        server_ctx, client_ctx = _contexts(Path(tmp))
    handshakes = []
    for _ in range(20):
        pair = _Pair(server_ctx, client_ctx)
        t0 = time.process_time()
        pair.handshake()
        handshakes.append(time.process_time() - t0)
    frame = PublishEncoder("bench/t", 64).frame(0, 1)
    per_message: dict[int, float] = {}
    throughput: dict[int, float] = {}
    for batch in BATCHES:
        data = frame * batch
        if pair.send(data) != data:
            raise RuntimeError("TLS round trip changed the data")
        rounds = 0
        t0 = time.process_time()
        while (elapsed := time.process_time() - t0) < budget_s or rounds < 10:
            pair.send(data)
            rounds += 1
        per_message[batch] = elapsed / (rounds * batch) * 1e9
        throughput[batch] = rounds * len(data) / elapsed / 1e6
    cipher = pair.client.cipher()
    return MicroResult(
        cipher=cipher[0] if cipher else "?",
        version=pair.client.version() or "?",
        handshake_ms=sorted(handshakes)[len(handshakes) // 2] * 1e3,
        frame_bytes=len(frame),
        ns_per_message=per_message,
        mb_per_s=throughput,
    )


def main() -> None:
    res = measure()
    print(f"{res.version}, {res.cipher}; handshake (both ends' CPU) {res.handshake_ms:.2f} ms")
    print(f"publish frame of a 64-byte payload: {res.frame_bytes} bytes")
    for batch in BATCHES:
        print(
            f"  {batch:>5} frames a write: {res.ns_per_message[batch]:8.0f} ns a message"
            f" (encrypt + decrypt), {res.mb_per_s[batch]:7.1f} MB/s"
        )


if __name__ == "__main__":
    main()
