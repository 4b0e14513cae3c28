"""Render ota_site/deploy/nginx.conf: replace each ``${OTA_...}`` placeholder, nothing else.

This is what the official nginx image does to the same file in docker-compose.yml (envsubst,
limited to ``OTA_`` variables by NGINX_ENVSUBST_FILTER), so prod-local and compose read one
template. nginx's own variables ($host, $ota_to_https, ...) are lower case and never match.
On a host without Docker, render it from the environment:

    OTA_SERVER_NAME=ota.example.com ... python -m ota_site.deploy.render > /etc/nginx/ota.conf
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf"
PLACEHOLDER = re.compile(r"\$\{(OTA_[A-Z0-9_]+)\}")


def placeholders(template: str) -> set[str]:
    """The OTA_ names the template needs."""
    return set(PLACEHOLDER.findall(template))


def render(template: str, values: Mapping[str, str]) -> str:
    """The template with every placeholder replaced; KeyError names any value missing (envsubst
    would leave it empty, and nginx would refuse the result with a less helpful message)."""
    missing = sorted(placeholders(template) - set(values))
    if missing:
        raise KeyError(f"no value for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def main() -> int:
    """Print the template rendered with the OTA_ variables of the environment."""
    try:
        sys.stdout.write(render(TEMPLATE.read_text(), os.environ))
    except KeyError as exc:
        print(f"{TEMPLATE}: {exc.args[0]}; set them in the environment", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
