"""Container health probe: exit 0 when URL (default: the API server's /health) answers 200, else 1.

Standard library only, so it runs in any of the image's uses; `docker run --health-cmd` passes another URL.
"""

import sys
import urllib.request

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/health"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
