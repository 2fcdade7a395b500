"""Flower settings: ``celery -A gathering_tasks flower --conf=config/flowerconfig.py``.

Flower listens on 127.0.0.1 unless FLOWER_ADDRESS says otherwise, and refuses to start on any
other address without basic auth (FLOWER_BASIC_AUTH=user:password, from the environment,
never from this file).
"""

import ipaddress
import os

address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
port = int(os.environ.get("FLOWER_PORT", "5555"))
basic_auth = [os.environ["FLOWER_BASIC_AUTH"]] if os.environ.get("FLOWER_BASIC_AUTH") else []


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if not basic_auth and not os.environ.get("FLOWER_AUTH") and not _is_loopback(address):
    raise SystemExit(
        f"refusing to expose Flower on {address} without authentication: "
        "set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH for OAuth)"
    )

natural_time = True
persistent = False
max_tasks = 10000
