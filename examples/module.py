"""A pipeline module that advertises its capabilities and answers requests, on the asyncio
client. Requests are JSON on `modules/<name>/requests`: {"id": ..., "op": ..., "args": [...],
"reply_to": TOPIC}; each answer goes to its `reply_to` topic as {"id": ..., "result": ...} or
{"id": ..., "error": ...}. The broker queues requests while the module restarts. A module
taken over by another process of the same name exits with status 1.

    TETHER_PASSWORD=... .venv/bin/python examples/module.py serve calc
    TETHER_PASSWORD=... .venv/bin/python examples/module.py call calc add 2 3      # prints 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

from _common import connection_settings, show_client_logs

from tether.client import AsyncClient, Message, TetherError, Timeout

OPERATIONS: dict[str, Callable[..., Any]] = {
    "add": lambda *xs: sum(xs),
    "mul": lambda *xs: math.prod(xs),
    "upper": lambda s: str(s).upper(),
}


async def serve(name: str) -> int:
    metadata = {
        "name": name,
        "kind": "module",
        "version": "0.3.0",
        "capabilities": sorted(OPERATIONS),
    }
    async with AsyncClient(
        client_id=f"module-{name}",
        metadata=metadata,
        state_file=f".module-{name}.state",
        **connection_settings(),
    ) as client:

        async def answer(message: Message) -> None:
            try:
                request = json.loads(message.payload)
                reply_to, request_id = request["reply_to"], request.get("id")
            except (ValueError, KeyError, TypeError):
                return  # not a request: nobody to answer
            try:
                result = {"id": request_id, "result": OPERATIONS[request["op"]](*request["args"])}
            except KeyError:
                result = {"id": request_id, "error": f"unknown op; try one of {sorted(OPERATIONS)}"}
            except Exception as exc:  # a bad request is answered, never fatal to the module
                result = {"id": request_id, "error": f"{type(exc).__name__}: {exc}"}
            # Confirmed: the handler returns (and the request is acked) only once the answer
            # is with the broker, so a crash in between means the request comes again.
            await client.publish(reply_to, json.dumps(result), confirm=True)

        await client.subscribe(f"modules/{name}/requests", answer)
        print(f"module {name}: serving {', '.join(sorted(OPERATIONS))}", flush=True)
        # Until interrupted, or until the client stops by itself: taken over by another
        # process serving this name (which now gets the requests), or refused by the broker.
        while not client.closed:
            await asyncio.sleep(0.2)
    if client.error is not None:
        print(f"module {name}: stopped: {client.error}", file=sys.stderr, flush=True)
        return 1
    return 0


async def call(name: str, op: str, args: list[str], timeout: float) -> int:
    inbox = f"replies/{uuid.uuid4().hex}"
    async with AsyncClient(client_id=f"caller-{os.getpid()}", **connection_settings()) as client:
        replies = await client.subscribe(inbox)  # before asking, so the answer cannot be missed
        request_id = uuid.uuid4().hex
        values = [json.loads(a) if _is_json(a) else a for a in args]
        request = {"id": request_id, "op": op, "args": values, "reply_to": inbox}
        await client.publish(f"modules/{name}/requests", json.dumps(request), confirm=True)
        try:
            while True:
                message = await replies.get(timeout=timeout)
                if message is None:
                    return 1
                answer = json.loads(message.payload)
                if answer.get("id") == request_id:
                    break
        except Timeout:
            print(f"no answer from module {name!r} within {timeout:g} s: is it running?")
            return 1
        finally:
            await client.unregister()  # a one-shot caller leaves no session behind
    if "error" in answer:
        print(f"error: {answer['error']}")
        return 1
    print(answer["result"])
    return 0


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve")
    serve_cmd.add_argument("name")
    call_cmd = commands.add_parser("call")
    call_cmd.add_argument("name")
    call_cmd.add_argument("op")
    call_cmd.add_argument("args", nargs="*")
    call_cmd.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    show_client_logs()
    try:
        if args.command == "serve":
            with contextlib.suppress(KeyboardInterrupt):
                return asyncio.run(serve(args.name))
            return 0
        return asyncio.run(call(args.name, args.op, args.args, args.timeout))
    except TetherError as exc:  # e.g. the state file in use by another `serve` of this name
        print(f"module {args.name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
