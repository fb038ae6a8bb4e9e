"""A subscriber that keeps going through broker restarts, network cuts, and its own
restarts. Its state file keeps the session and the last seq handled per topic, so after a
restart of the script it resumes, gets what was queued meanwhile, and never shows a message
twice. A broker restart changes nothing either: the broker keeps sessions and queues in its
data directory. If the broker forgot the session (it expired, or the broker runs
`--in-memory` and restarted), the client registers afresh, re-subscribes, and says so; what
was queued for it then is lost.

    TETHER_PASSWORD=... .venv/bin/python examples/resilient_subscriber.py alerts metrics
    (kill and restart this script, or the broker: nothing is lost or repeated)
"""

from __future__ import annotations

import argparse
import time

from _common import connection_settings, show_client_logs

from tether.client import Client, Dropped, Message, SessionLost, TetherError


def show(message: Message) -> None:
    again = " (redelivered)" if message.redelivered else ""
    print(
        f"{message.topic} #{message.seq}{again}: {message.payload.decode(errors='replace')}",
        flush=True,
    )


def session_lost(error: SessionLost) -> None:
    print(f"! {error} (re-subscribed; messages published meanwhile are gone)", flush=True)


def dropped(event: Dropped) -> None:
    where = event.topic or "all topics"
    print(f"! the broker dropped {event.count} message(s) on {where}: queue overflow", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topics", nargs="+")
    parser.add_argument("--client-id", default="resilient-subscriber")
    parser.add_argument("--state", default=".resilient-subscriber.state")
    args = parser.parse_args()
    show_client_logs()

    try:
        with Client(
            client_id=args.client_id,
            state_file=args.state,
            keepalive=5,  # notice a dead broker within seconds
            backoff_cap=5.0,  # and come back soon after it does
            connect_timeout=300.0,
            on_session_lost=session_lost,
            on_dropped=dropped,
            **connection_settings(),
        ) as client:
            for topic in args.topics:
                client.subscribe(topic, show)
            print(f"listening on {', '.join(args.topics)}; Ctrl-C to stop", flush=True)
            try:
                while not client.closed:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    except TetherError as exc:  # e.g. the state file in use by another process
        raise SystemExit(f"stopped: {exc}") from None
    if client.error is not None:
        raise SystemExit(f"stopped: {client.error}")


if __name__ == "__main__":
    main()
