#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 when GET /readyz answers 200 with status "ready", else 1.

Standard library only (the slim images have no curl). URL: $HEALTHCHECK_URL, default
http://127.0.0.1:8000/readyz. /readyz is public (no API key) and says 503 while the model and
index load, after a failed load and while the service shuts down.
"""
import json
import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:8000/readyz")


def main() -> int:
    try:
        with urllib.request.urlopen(URL, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "4"))) as resp:
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {URL} answered {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {URL}: {exc}", file=sys.stderr)
        return 1
    if body.get("status") != "ready":
        print(f"unhealthy: {URL} says {body.get('status')!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
