"""The command line of ``python -m fake_bitrix24``: serve out of process until SIGTERM.

Benchmarks run the fake in a process of its own (its own GIL and CPU); it prints one JSON line
with the webhook and control URLs (and, with ``--install``, the installed portals with their
tokens and ONAPPINSTALL forms), then serves.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from types import FrameType

from fake_bitrix24.apps import installation_summary
from fake_bitrix24.server import FakeBitrix24
from fake_bitrix24.state import DEFAULT_PORTAL


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``python -m fake_bitrix24``."""
    parser = argparse.ArgumentParser(description="Fake Bitrix24 REST server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--portals", type=int, default=1, help="portals, one webhook each")
    parser.add_argument("--burst", type=float, default=None, help="leaky bucket size (off)")
    parser.add_argument("--rate", type=float, default=2.0, help="bucket drain per second")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--slow-rate", type=float, default=0.0)
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--operating-limit", type=float, default=None)
    parser.add_argument("--error-code", default="", choices=["", "ERROR_CORE"])
    parser.add_argument("--no-strict", action="store_true", help="accept extra message keys")
    parser.add_argument("--deny-webhook-app-methods", action="store_true")
    parser.add_argument("--deny-statistics", action="store_true")
    parser.add_argument("--client-id", default=None, help="the application's client id (--install)")
    parser.add_argument("--client-secret", default=None, help="the application's client secret")
    parser.add_argument(
        "--install", action="append", default=[], metavar="DOMAIN", help="install the application on a portal"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> dict[str, object]:
    """FakeConfig changes from parsed command-line options."""
    return {
        "burst": args.burst,
        "rate": args.rate,
        "error_rate": args.error_rate,
        "drop_rate": args.drop_rate,
        "slow_rate": args.slow_rate,
        "slow_seconds": args.slow_seconds,
        "latency": args.latency,
        "seed": args.seed,
        "operating_limit": args.operating_limit,
        "error_code": args.error_code,
        "strict_messages": not args.no_strict,
        "deny_webhook_app_methods": args.deny_webhook_app_methods,
        "deny_statistics": args.deny_statistics,
    }


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT after printing one JSON line with the URLs."""
    args = build_parser().parse_args(argv)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    fake = FakeBitrix24(host=args.host, port=args.port)
    fake.configure(**config_from_args(args))
    with fake:
        portals = {DEFAULT_PORTAL: fake.webhook_url}
        for number in range(2, args.portals + 1):
            portals[f"portal{number}"] = fake.add_webhook(portal=f"portal{number}")
        announcement = {
            "webhook_url": fake.webhook_url,
            "webhook_urls": list(portals.values()),
            "portals": portals,
            "control_url": fake.control_url,
            "base_url": fake.base_url,
            "port": fake.port,
        }
        if args.install:
            app = fake.create_app(client_id=args.client_id, client_secret=args.client_secret)
            installations = [fake.install(domain, app) for domain in args.install]
            announcement["oauth_url"] = fake.oauth_url
            announcement["app"] = {"client_id": app.client_id, "client_secret": app.client_secret}
            announcement["installations"] = [
                {**installation_summary(item), "payload": fake.install_payload(item)} for item in installations
            ]
        print(json.dumps(announcement), flush=True)
        while not stop.wait(0.2):
            pass
    return 0
