"""Commands that talk to a running server: ps, load, unload, log stream, server start/stop/status."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import urlencode

from mlxserve import daemon
from mlxserve.client import AdminClient
from mlxserve.commands.disk import table
from mlxserve.settings import Settings, human_bytes


def client_for(settings: Settings, args: argparse.Namespace) -> AdminClient:
    """The running server: --host/--port, else what `server start` recorded, else the defaults."""
    record = daemon.running(settings.home)
    host = args.host or (record.host if record else settings.host)
    port = args.port or (record.port if record else settings.port)
    return AdminClient(daemon.base_url(host, port), api_key=settings.key())


def ps(client: AdminClient, as_json: bool) -> None:
    reply = client.get("/api/v0/ps")
    if as_json:
        print(json.dumps(reply, indent=2))
        return
    loaded, memory = reply["data"], reply["memory"]
    if loaded:
        print(table([[m["id"], m["kind"], human_bytes(m["memory_bytes"]), duration(m["expires_in_seconds"]),
                       str(m["requests_in_flight"])] for m in loaded],
                     ["NAME", "KIND", "MEMORY", "TTL LEFT", "IN FLIGHT"]))
    else:
        print("No models loaded.")
    print(f"MLX memory: {human_bytes(memory['active_bytes'])} in use, {human_bytes(memory['cache_bytes'])} "
          f"cached; budget {human_bytes(memory['budget_bytes'])}")
    if reply.get("ranks"):
        print(table([[str(r["rank"]), r["host"], str(r["pid"]), human_bytes(r["active_bytes"]),
                      "up" if r["alive"] else "lost", ", ".join(r["models"]) or "-"] for r in reply["ranks"]],
                    ["RANK", "HOST", "PID", "MEMORY", "STATE", "MODELS"]))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def log_stream(client: AdminClient, model: str | None, output: bool, as_json: bool) -> None:
    query = urlencode({k: v for k, v in (("model", model), ("output", "true" if output else None)) if v})
    for event in client.events("/api/v0/logs/stream" + (f"?{query}" if query else "")):
        if event["type"] == "hello":
            print("Following the server's requests (Ctrl-C to stop)…", file=sys.stderr, flush=True)
        elif as_json:
            print(json.dumps(event), flush=True)
        else:
            print_event(event)


def print_event(event: dict[str, Any]) -> None:
    kind = event["type"]
    when = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
    if kind == "request":
        images = f", {event['images']} image(s)" if event.get("images") else ""
        print(f"\n[{when}] #{event['id']} {event['model']} {event['endpoint']}: {event['prompt_tokens']} prompt "
              f"tokens ({event['cached_tokens']} from cache){images}\n--- prompt ---\n{event['prompt']}\n"
              "--- end of prompt ---", flush=True)
    elif kind == "output":
        print(event["text"], end="", flush=True)
    elif kind == "done":
        print(f"\n[{when}] #{event['id']} done: {event['prompt_tokens']} prompt + "
              f"{event['completion_tokens']} completion tokens", flush=True)


def server(settings: Settings, args: argparse.Namespace, argv: list[str]) -> None:
    if args.action == "start":
        serve_args = argv[argv.index("start") + 1:]
        print("Starting mlxserve in the background…", file=sys.stderr, flush=True)
        record = daemon.start(settings.home, settings.host, settings.port, serve_args)
        print(f"mlxserve is running on {record.url}/v1 (pid {record.pid}); log: {record.log}")
    elif args.action == "stop":
        record = daemon.stop(settings.home)
        print(f"Stopped mlxserve (pid {record.pid})." if record else "No background server is running.")
    else:
        client = client_for(settings, args)
        loaded = client.get("/api/v0/ps")["data"]
        record = daemon.running(settings.home)
        pid = f" (pid {record.pid})" if record else ""
        names = ", ".join(m["id"] for m in loaded) or "none"
        print(f"mlxserve is running on {client.base_url}/v1{pid}; loaded models: {names}")


