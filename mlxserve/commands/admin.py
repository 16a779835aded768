"""`mlxserve service ...` and `mlxserve config show`: the server as a service, and its settings."""

from __future__ import annotations

import argparse
import subprocess
import sys

from mlxserve import daemon, service as services
from mlxserve.client import AdminClient, ClientError
from mlxserve.service import current_platform
from mlxserve.settings import Settings, config_path, describe, resolve


def service(settings: Settings, args: argparse.Namespace) -> None:
    platform = getattr(args, "platform", current_platform())
    plan = services.plan(platform, settings.home.resolve(), args.config.resolve() if args.config else None)
    if args.action in ("install", "uninstall") and args.dry_run:
        print(services.describe(plan, args.action))
        return
    if args.action == "install":
        warnings = services.install(plan, settings.home, start=not args.no_start)
        print(f"Wrote {plan.path}")
    elif args.action == "uninstall":
        warnings = services.uninstall(plan, settings.home)
        print(f"Removed {plan.path}")
    elif args.action == "status":
        print(f"service file: {plan.path} ({'installed' if plan.path.exists() else 'not installed'})")
        if plan.path.exists():
            try:
                result = subprocess.run(plan.status, capture_output=True, text=True)
                print("service: " + services.status_summary(plan.platform, result.returncode, result.stdout))
            except FileNotFoundError:
                print(f"service: {plan.status[0]} is not installed")
        try:
            health = AdminClient(daemon.base_url(settings.host, settings.port)).get("/health")
            print(f"server: {health['status']} on http://{settings.host}:{settings.port}/v1, "
                  f"{health['active_requests']} requests in flight")
        except ClientError as exc:
            print(f"server: {exc}")
        return
    else:
        path = settings.log_path
        lines = path.read_text(errors="replace").splitlines()[-args.lines:] if path.exists() else []
        print("\n".join(lines) if lines else f"No log yet at {path}")
        return
    for warning in warnings:
        print(f"mlxserve: warning: {warning}", file=sys.stderr)


def config_show(args: argparse.Namespace) -> None:
    settings, sources = resolve({"home": args.home}, config=args.config)
    rows = describe(settings, sources)
    print(f"# settings file: {config_path(settings.home, args.config)}")
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        print(f"{name.ljust(width)}  {value}  ({source})")


