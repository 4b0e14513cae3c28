"""Settings for tests/bench/bench_http.py: production settings plus a no-op view to compare with.

The no-op view is served by the same gunicorn, through the same middleware, so the ratio of the
device API's throughput to it measures what our code costs, not the machine.
"""

from ota_site.settings import *  # noqa: F403

ROOT_URLCONF = "tests.bench.noop_urls"
