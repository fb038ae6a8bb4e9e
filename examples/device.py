"""A fleet device: registers with its metadata, heartbeats its health, publishes telemetry and
obeys commands. The fleet-manager pattern: a manager subscribes to `fleet/telemetry` and
publishes to `fleet/<device>/commands`; the broker keeps the device's session (and its
commands) while it is offline.

    TETHER_PASSWORD=... .venv/bin/python examples/device.py sensor-7 [--interval 5] [--count N]
    TETHER_PASSWORD=... .venv/bin/tether pub fleet/sensor-7/commands '{"interval": 1}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from _common import connection_settings, show_client_logs

from tether.client import Client, Health, Message, TetherError


class Device:
    def __init__(self, name: str, interval: float) -> None:
        self.name = name
        self.interval = interval
        self.readings = 0

    def health(self) -> Health:
        # Sent with every keepalive ping; the broker logs it and keeps the latest.
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
        status = "healthy" if load < 0.8 else "degraded" if load < 2 else "unhealthy"
        return Health(status, {"load": round(load, 2), "readings": self.readings})

    def on_command(self, message: Message) -> None:
        command = json.loads(message.payload)
        if "interval" in command:
            self.interval = float(command["interval"])
        print(f"{self.name}: command {command} (seq {message.seq})", flush=True)

    def reading(self) -> bytes:
        self.readings += 1
        return json.dumps(
            {"device": self.name, "n": self.readings, "t": time.time(), "load": os.getloadavg()[0]}
        ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    parser.add_argument("--count", type=int, help="stop after this many readings")
    args = parser.parse_args()
    show_client_logs()

    device = Device(args.name, args.interval)
    metadata = {
        "name": args.name,
        "kind": "sensor",
        "version": "1.4.2",
        "tags": ["building-a", platform.machine()],
        "capabilities": ["telemetry", "set-interval"],
    }
    try:
        with Client(
            client_id=args.name,
            metadata=metadata,
            keepalive=10,
            health=device.health,
            state_file=f".{args.name}.state",  # a restarted device resumes its session
            **connection_settings(),
        ) as client:
            client.subscribe(f"fleet/{args.name}/commands", device.on_command)
            print(f"{args.name}: online as session {client.session_id}", flush=True)
            while args.count is None or device.readings < args.count:
                client.publish("fleet/telemetry", device.reading())
                time.sleep(device.interval)
    except TetherError as exc:  # taken over by another process, refused, ...: say why
        raise SystemExit(f"{args.name}: stopped: {exc}") from None
    print(f"{args.name}: sent {device.readings} readings", flush=True)


if __name__ == "__main__":
    main()
