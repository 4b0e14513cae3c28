"""Settings, read from the environment only (see .env.example and docs/configuration.md).

With no environment set the server runs in the *embedded* mode: SQLite and files under ``var/``,
a file-based cache, an in-process channel layer and Celery on kombu's filesystem transport, so
``make demo`` needs nothing but Python. ``DATABASE_URL``, ``REDIS_URL`` and ``STORAGE=s3`` switch to
PostgreSQL, Redis and S3. Values that cannot be used are recorded in ``CONFIG_ERRORS`` and reported
by the system checks in ``ota_site/checks.py`` at start-up, instead of crashing on import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

from ota_site import dbconfig
from ota_site.ratelimit import parse_rate

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# Secrets may come from files (Docker/Kubernetes secrets): DJANGO_SECRET_KEY_FILE=/run/secrets/...
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

CONFIG_ERRORS: list[tuple[str, str]] = []  # (check id, message), reported by ota_site.checks


def _secret(name: str, default: str | None = None) -> str | None:
    """Read NAME, or the contents of the file named by NAME_FILE."""
    path = env.str(f"{name}_FILE", default="")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            CONFIG_ERRORS.append(("ota.E001", f"{name}_FILE={path!r} cannot be read: {exc}"))
            return default
    return env.str(name, default=default)


def _typed(kind: str, name: str, default: Any) -> Any:
    """env.int/float/bool that records a bad value as a configuration error instead of crashing."""
    try:
        return getattr(env, kind)(name, default=default)
    except (ValueError, TypeError, ImproperlyConfigured):
        CONFIG_ERRORS.append(("ota.E010", f"{name}={env.str(name, default='')!r} is not a {kind}."))
        return default


VAR_DIR = Path(env.str("OTA_VAR_DIR", default=str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = _typed("bool", "DJANGO_DEBUG", False)


def _embedded_secret_key() -> str:
    """A random key kept under var/, so the embedded mode is safe without any configuration."""
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(50)
        path.write_text(key)
        path.chmod(0o600)
        return key


SECRET_KEY = _secret("DJANGO_SECRET_KEY") or _embedded_secret_key()
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# Behind nginx, which terminates TLS and sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https")
    if _typed("bool", "DJANGO_BEHIND_TLS_PROXY", False)
    else None
)

INSTALLED_APPS = [
    "ota_site.admin_site.OtaAdminConfig",  # django.contrib.admin with the role check at the door
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "corsheaders",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "ota_site",
    "devices",
    "firmware",
    "rollouts",
    "metrics",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "ota_site.middleware.RequestContextMiddleware",
    # Right after the request id is bound: times everything below it, writes the access log.
    "ota_site.observability.RequestMetricsMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    # Early, so a refused request costs little; after CORS, so browsers can read its 429.
    "ota_site.ratelimit.RateLimitMiddleware",
    "ota_site.middleware.BodySizeLimitMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "ota_site.urls"
WSGI_APPLICATION = "ota_site.wsgi.application"
ASGI_APPLICATION = "ota_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "ota_site.context_processors.console",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# PostgreSQL (pool, prepared poll read, no per-request health check) or SQLite; a read replica for
# analytics (ota_site.db.analytics). Built by ota_site/dbconfig.py.
DATABASE_URL, DATABASES, DATABASE_REPLICA_URL = dbconfig.databases(
    env, _typed, VAR_DIR, CONFIG_ERRORS
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, Celery broker, channel layer ---------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
CACHE_KEY_PREFIX = env.str("CACHE_KEY_PREFIX", default="ota")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "ota_site.cache_backend.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": CACHE_KEY_PREFIX,
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{CACHE_KEY_PREFIX}:asgi"},
        }
    }
else:
    # A file-based cache is shared by every process of the embedded mode (web workers and the
    # Celery worker), so invalidation works there too; locmem would be per process.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
            "KEY_PREFIX": CACHE_KEY_PREFIX,
        }
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Streams (metrics.consumers; docs/console.md "Live streams") -----------------------------
# Consumers read new event rows when the channel layer wakes them, and on this timer too. The
# in-memory layer of the embedded mode does not cross processes (gunicorn and Celery publish,
# daphne holds the sockets), so there the timer delivers, every second; with Redis it is a slow
# safety net for a lost wake-up.
STREAM_POLL_INTERVAL = _typed("float", "STREAM_POLL_INTERVAL", 10.0 if REDIS_URL else 1.0)
# The fleet stream sends at most one aggregated message per this many seconds.
STREAM_FLEET_INTERVAL = _typed("float", "STREAM_FLEET_INTERVAL", 1.0)
# Fleet counts are recomputed at most this often per daphne process.
STREAM_FLEET_COUNTS_TTL = _typed("float", "STREAM_FLEET_COUNTS_TTL", 1.0)
# How long a stream holds back newer events while an older event id is not committed yet; an id
# still missing after that was a rolled-back insert (or a transaction longer than this).
STREAM_GAP_GRACE = _typed("float", "STREAM_GAP_GRACE", 3.0)
# An open stream re-checks its listener this often: a revoked API key, a deactivated user or a
# removed role closes it (4401/4403) within this many seconds.
STREAM_RECHECK_INTERVAL = _typed("float", "STREAM_RECHECK_INTERVAL", 30.0)

# --- Celery ------------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="") or REDIS_URL or "filesystem://"
if CELERY_BROKER_URL == "filesystem://":
    _queue_dir = VAR_DIR / "celery" / "queue"
    _queue_dir.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "control_folder": str(VAR_DIR / "celery" / "control"),
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True  # a task lost with its worker is run again
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = _typed("bool", "CELERY_TASK_ALWAYS_EAGER", False)
# One queue name per installation, so deployments (or test runs) sharing a Redis never take
# each other's tasks.
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_QUEUE", default="ota")

# --- Storage --------------------------------------------------------------------------------
STORAGE = env.str("STORAGE", default="") or "local"
MEDIA_ROOT = env.str("MEDIA_ROOT", default=str(VAR_DIR / "media"))
MEDIA_URL = "/media/"  # never routed: firmware is served by the download view only
STATIC_ROOT = env.str("STATIC_ROOT", default=str(VAR_DIR / "static"))
STATIC_URL = "/static/"
Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)  # whitenoise expects it at start-up
STATICFILES_DIRS = [BASE_DIR / "static"]
# Hashed, compressed static files once `collectstatic` has run (make demo, the Docker image);
# before that, whitenoise serves them straight from the apps so pages still work.
_collected = (Path(STATIC_ROOT) / "staticfiles.json").is_file()
_static_backend = (
    "whitenoise.storage.CompressedManifestStaticFilesStorage"
    if _typed("bool", "STATIC_MANIFEST", _collected)
    else "django.contrib.staticfiles.storage.StaticFilesStorage"
)
WHITENOISE_USE_FINDERS = not _collected
if STORAGE == "s3":
    AWS_STORAGE_BUCKET_NAME = env.str("AWS_STORAGE_BUCKET_NAME", default="")
    AWS_S3_ENDPOINT_URL = env.str("AWS_S3_ENDPOINT_URL", default=None)
    # Where devices reach the same store, when not at AWS_S3_ENDPOINT_URL (MinIO inside compose
    # is http://minio:9000 to the app): signed download URLs are made for this endpoint
    # (ota_site.storage).
    AWS_S3_PUBLIC_ENDPOINT_URL = env.str("AWS_S3_PUBLIC_ENDPOINT_URL", default=None)
    AWS_S3_REGION_NAME = env.str("AWS_S3_REGION_NAME", default=None)
    AWS_ACCESS_KEY_ID = _secret("AWS_ACCESS_KEY_ID")
    AWS_SECRET_ACCESS_KEY = _secret("AWS_SECRET_ACCESS_KEY")
    AWS_QUERYSTRING_AUTH = True
    AWS_QUERYSTRING_EXPIRE = _typed("int", "AWS_QUERYSTRING_EXPIRE", 300)  # signed URL lifetime
    AWS_DEFAULT_ACL = None
    AWS_S3_FILE_OVERWRITE = False
    # Server-side encryption at rest; AWS_S3_SSE="" leaves it to the bucket's default.
    _sse = env.str("AWS_S3_SSE", default="AES256")
    AWS_S3_OBJECT_PARAMETERS = {"ServerSideEncryption": _sse} if _sse else {}
    _default_storage: dict[str, Any] = {"BACKEND": "ota_site.storage.FirmwareS3Storage"}
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": MEDIA_ROOT, "base_url": MEDIA_URL},
    }
STORAGES = {"default": _default_storage, "staticfiles": {"BACKEND": _static_backend}}
# Local storage behind nginx: downloads answer with X-Accel-Redirect to this internal nginx
# location (ota_site/deploy/nginx.conf) and nginx sends the bytes; empty: Python sends them.
FIRMWARE_X_ACCEL_PREFIX = env.str("FIRMWARE_X_ACCEL_PREFIX", default="")
if FIRMWARE_X_ACCEL_PREFIX and not (
    FIRMWARE_X_ACCEL_PREFIX.startswith("/") and FIRMWARE_X_ACCEL_PREFIX.endswith("/")
):
    CONFIG_ERRORS.append(
        (
            "ota.E060",
            f"FIRMWARE_X_ACCEL_PREFIX={FIRMWARE_X_ACCEL_PREFIX!r} must start and end with '/'.",
        )
    )
    FIRMWARE_X_ACCEL_PREFIX = ""
WHITENOISE_MANIFEST_STRICT = False  # a missing collectstatic entry degrades, never a 500

# Firmware uploads: every file is streamed to a temporary file on disk, hashed on the way
# (firmware.uploads.HashingUploadHandler), and refused with 413 past the limit.
FIRMWARE_MAX_UPLOAD_SIZE = _typed("int", "FIRMWARE_MAX_UPLOAD_SIZE", 2 * 1024**3)
FILE_UPLOAD_HANDLERS = ["firmware.uploads.HashingUploadHandler"]
FILE_UPLOAD_TEMP_DIR = env.str("FILE_UPLOAD_TEMP_DIR", default=None)
DATA_UPLOAD_MAX_MEMORY_SIZE = _typed("int", "DATA_UPLOAD_MAX_MEMORY_SIZE", 1024 * 1024)
FIRMWARE_SIGNING_KEY_PATH = Path(
    env.str("FIRMWARE_SIGNING_KEY_PATH", default=str(VAR_DIR / "keys" / "firmware-ed25519.pem"))
)
FIRMWARE_CACHE_TIMEOUT = _typed("int", "FIRMWARE_CACHE_TIMEOUT", 3600)
# The live rollouts and published firmware are also kept this long in each process (seconds;
# ota_site.cache): a poll then needs no Redis read for them, and a change reaches other
# processes' polls this much later. 0 turns the copies off.
CACHE_LOCAL_SECONDS = _typed("float", "CACHE_LOCAL_SECONDS", 1.0)
# A device's last "nothing to install" answer is kept this long in Redis (seconds) and answers its
# next polls without the database, until the database says something it depends on changed
# (ota_site.answers, docs/answer-cache.md). Needs REDIS_URL, PostgreSQL and the listener (Celery
# beat runs it). 0 turns it off.
POLL_ANSWER_CACHE_SECONDS = _typed("int", "POLL_ANSWER_CACHE_SECONDS", 600)
# Seconds between two storage read-back checks of published firmware (firmware.tasks; daily).
FIRMWARE_VERIFY_INTERVAL = _typed("float", "FIRMWARE_VERIFY_INTERVAL", 86400.0)
# Where new firmware signing keys are made: "sealed" (in the database, under the master key) or
# "pkcs11" (generated in a PKCS#11 token/HSM that never lets them out; firmware.hsm, needs the
# `hsm` extra). Keys already made stay where they are; check ota.E040.
FIRMWARE_SIGNING_BACKEND = env.str("FIRMWARE_SIGNING_BACKEND", default="sealed")
PKCS11_MODULE = env.str("PKCS11_MODULE", default="")  # e.g. /usr/lib/softhsm/libsofthsm2.so
PKCS11_TOKEN_LABEL = env.str("PKCS11_TOKEN_LABEL", default="")
PKCS11_PIN = _secret("PKCS11_PIN") or ""  # the user PIN, or PKCS11_PIN_FILE

# --- TUF repository (firmware.tuf_repo; docs/security.md "TUF") ----------------------------------
# The embedded mode (SQLite) creates a one-key repository on the first publish, its root key in
# TUF_ROOT_KEY_DIR; production runs `manage.py tuf init` with offline root keys (check ota.W030).
TUF_AUTO_INIT = _typed(
    "bool", "TUF_AUTO_INIT", DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
)
TUF_ROOT_KEY_DIR = Path(env.str("TUF_ROOT_KEY_DIR", default=str(VAR_DIR / "keys" / "tuf-root")))
# Off: metadata (it lists versions and device types) is for devices and signed-in users only.
TUF_METADATA_PUBLIC = _typed("bool", "TUF_METADATA_PUBLIC", False)
# Lifetimes in seconds; each role is re-signed once half of its lifetime is gone.
TUF_ROOT_EXPIRY = _typed("int", "TUF_ROOT_EXPIRY", 365 * 86400)
TUF_TARGETS_EXPIRY = _typed("int", "TUF_TARGETS_EXPIRY", 365 * 86400)
TUF_SNAPSHOT_EXPIRY = _typed("int", "TUF_SNAPSHOT_EXPIRY", 7 * 86400)
TUF_TIMESTAMP_EXPIRY = _typed("int", "TUF_TIMESTAMP_EXPIRY", 86400)
TUF_REFRESH_INTERVAL = _typed("float", "TUF_REFRESH_INTERVAL", 3600.0)  # the beat task

# --- Secrets at rest (ota_site.keystore) -------------------------------------------------------
# Private keys in the database are sealed with this master key (base64 of 32 bytes). Unset, the
# embedded mode keeps one in OTA_MASTER_KEY_PATH (created on first use, mode 0600).
OTA_MASTER_KEY = _secret("OTA_MASTER_KEY") or ""
OTA_MASTER_KEY_PATH = Path(
    env.str("OTA_MASTER_KEY_PATH", default=str(VAR_DIR / "keys" / "master.key"))
)
# Retired master keys that still open old envelopes until `manage.py keys rewrap` has run.
OTA_MASTER_KEYS_OLD = env.list("OTA_MASTER_KEYS_OLD", default=[])

# --- Reverse proxies (ota_site.proxies) --------------------------------------------------------
# Forwarded headers (X-Forwarded-For, the verified client certificate) are believed only from
# these addresses or networks.
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES", default=[])


# --- Rate limits (ota_site.ratelimit) -----------------------------------------------------------
def _rate_limit(name: str, default: str) -> str:
    """N/sec, N/min or N/hour; 0 or off turns the limit off; empty means the default."""
    value = env.str(name, default="") or default
    try:
        parse_rate(value)
    except ValueError as exc:
        CONFIG_ERRORS.append(("ota.E013", f"{name}={value!r}: {exc}."))
        return default
    return value


# Requests under /api/ and /tuf/ per device (by its access token) and per client address.
RATE_LIMIT_DEVICE = _rate_limit("RATE_LIMIT_DEVICE", "10/min")
RATE_LIMIT_IP = _rate_limit("RATE_LIMIT_IP", "100/min")

# --- Devices --------------------------------------------------------------------------------
# Device access tokens are HS256 JWTs signed with a key derived from SECRET_KEY unless set.
DEVICE_JWT_SECRET = (
    _secret("DEVICE_JWT_SECRET")
    or hashlib.sha256(b"ota-device-jwt:" + SECRET_KEY.encode()).hexdigest()
)
DEVICE_JWT_LIFETIME = _typed("int", "DEVICE_JWT_LIFETIME", 900)  # seconds
# API keys are stored as HMAC-SHA256 keyed by this (ota_site.apikeys); changing it invalidates
# every key.
API_KEY_HMAC_KEY = (
    _secret("API_KEY_HMAC_KEY")
    or hashlib.sha256(b"ota-api-key-hmac:" + SECRET_KEY.encode()).hexdigest()
)
DEVICE_LAST_SEEN_INTERVAL = _typed("int", "DEVICE_LAST_SEEN_INTERVAL", 60)  # write coalescing
# With Redis, sightings are buffered there and written to last_seen by a beat task this often
# (seconds; ota_site.presence). Off: every stale last_seen is written by the request itself.
DEVICE_LAST_SEEN_BUFFER = _typed("bool", "DEVICE_LAST_SEEN_BUFFER", True)
DEVICE_LAST_SEEN_FLUSH_INTERVAL = _typed("float", "DEVICE_LAST_SEEN_FLUSH_INTERVAL", 10.0)
DEVICE_POLL_INTERVAL = _typed("int", "DEVICE_POLL_INTERVAL", 60)  # suggested to clients
DEVICE_ONLINE_WINDOW = _typed("int", "DEVICE_ONLINE_WINDOW", 600)  # "online" if seen within
DEVICE_METADATA_MAX_BYTES = _typed("int", "DEVICE_METADATA_MAX_BYTES", 16 * 1024)
# Device certificates (devices.ca): what the device CA issues to CSR-enrolled devices.
DEVICE_CERT_LIFETIME_DAYS = _typed("int", "DEVICE_CERT_LIFETIME_DAYS", 365)
DEVICE_CA_LIFETIME_DAYS = _typed("int", "DEVICE_CA_LIFETIME_DAYS", 3650)  # `device_ca init` default

# --- hawkBit DDI (rollouts.ddi): SWUpdate, rauc-hawkbit-updater, Zephyr ------------------------
# Devices reach {base}/{DDI_TENANT}/controller/v1/{controllerId}; the tenant is case-insensitive.
DDI_TENANT = env.str("DDI_TENANT", default="DEFAULT")
# A tenant-wide token (Authorization: GatewayToken ...); empty: gateway tokens are refused.
DDI_GATEWAY_TOKEN = _secret("DDI_GATEWAY_TOKEN") or ""
# Create a device unknown to the server on its first poll authenticated by the gateway token or a
# device certificate, as a device of DDI_DEFAULT_DEVICE_TYPE. Off: unknown devices get 404.
DDI_AUTO_CREATE = _typed("bool", "DDI_AUTO_CREATE", False)
DDI_DEFAULT_DEVICE_TYPE = env.str("DDI_DEFAULT_DEVICE_TYPE", default="")
# The "part" of an action's chunk (hawkBit's software module type). SWUpdate and RAUC ignore it;
# Zephyr's client accepts only "bApp": DDI_CHUNK_PARTS=zephyr-board=bApp sets it per device type.
DDI_CHUNK_PART = env.str("DDI_CHUNK_PART", default="os")
DDI_CHUNK_PARTS: dict[str, str] = env.dict("DDI_CHUNK_PARTS", default={})

# --- Rollouts --------------------------------------------------------------------------------
ROLLOUT_EVALUATION_INTERVAL = _typed("float", "ROLLOUT_EVALUATION_INTERVAL", 5.0)  # seconds
ROLLOUT_CACHE_TIMEOUT = _typed("int", "ROLLOUT_CACHE_TIMEOUT", 10)  # live rollouts seen by polls
# Device counts in rollout metrics (a scan of the targeted fleet) are reused this long.
ROLLOUT_METRICS_CACHE_TIMEOUT = _typed("int", "ROLLOUT_METRICS_CACHE_TIMEOUT", 30)
# Finished update sessions older than this many days are moved to archive files once a day
# (rollouts.tasks.archive_old_sessions, docs/operations.md); 0 turns the daily run off.
SESSION_ARCHIVE_DAYS = _typed("int", "SESSION_ARCHIVE_DAYS", 90)
# --- Observability (docs/observability.md) -------------------------------------------------------
# Celery workers write a heartbeat this often (ota_site.tasks); /health/ready fails and the
# OtaWorkerHeartbeatStale alert fires when the newest is older than WORKER_HEARTBEAT_MAX_AGE.
WORKER_HEARTBEAT_INTERVAL = _typed("float", "WORKER_HEARTBEAT_INTERVAL", 30.0)
WORKER_HEARTBEAT_MAX_AGE = _typed("float", "WORKER_HEARTBEAT_MAX_AGE", 120.0)
# Deadline of each /health/ready check (seconds): a dependency slower than this counts as down.
HEALTH_CHECK_TIMEOUT = _typed("float", "HEALTH_CHECK_TIMEOUT", 2.0)
# Where every process of this machine keeps its Prometheus samples (prometheus_client's
# multiprocess mode; ota_site.observability empties it when a new run starts). Per machine, never
# on a volume shared between machines or containers: the files are named by process id.
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default="") or str(
    Path(tempfile.gettempdir())
    / f"ota-prometheus-{hashlib.sha256(str(VAR_DIR).encode()).hexdigest()[:12]}"
)
# prometheus_client reads it from the environment, in this process and in those it forks.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_MULTIPROC_DIR
# /metrics answers only `Authorization: Bearer <token>` when set (or METRICS_TOKEN_FILE).
METRICS_TOKEN = _secret("METRICS_TOKEN") or ""
# The database gauges of /metrics are recomputed at most this often (seconds).
METRICS_CACHE_TIMEOUT = _typed("int", "METRICS_CACHE_TIMEOUT", 30)
# A Celery worker serves its own metrics on this port (0: off), for workers that do not share
# PROMETHEUS_MULTIPROC_DIR with a web process.
WORKER_METRICS_PORT = _typed("int", "WORKER_METRICS_PORT", 0)
WORKER_METRICS_ADDR = env.str("WORKER_METRICS_ADDR", default="0.0.0.0")  # noqa: S104
# OpenTelemetry traces over OTLP/HTTP (ota_site.telemetry; the `otel` extra). The exporter reads
# the standard OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_* variables itself.
OTEL_ENABLED = _typed("bool", "OTEL_ENABLED", False)
if OTEL_ENABLED and importlib.util.find_spec("opentelemetry.instrumentation.django") is None:
    CONFIG_ERRORS.append(
        ("ota.E081", 'OTEL_ENABLED=true needs the otel extra: pip install ".[otel]".')
    )

CELERY_BEAT_SCHEDULE = {
    # Proves that beat, the broker and a worker work (ota_site.tasks, /health/ready).
    "worker-heartbeat": {
        "task": "ota_site.tasks.worker_heartbeat",
        "schedule": WORKER_HEARTBEAT_INTERVAL,
        "options": {"expires": WORKER_HEARTBEAT_INTERVAL},
    },
    # Re-reads stored firmware and quarantines any whose bytes changed (firmware.tasks).
    "verify-firmware-storage": {
        "task": "firmware.tasks.verify_firmware_storage",
        "schedule": FIRMWARE_VERIFY_INTERVAL,
        "options": {"expires": FIRMWARE_VERIFY_INTERVAL},
    },
    # Re-signs TUF timestamp/snapshot/targets before they expire (firmware.tasks).
    "refresh-tuf-metadata": {
        "task": "firmware.tasks.refresh_tuf_metadata",
        "schedule": TUF_REFRESH_INTERVAL,
        "options": {"expires": TUF_REFRESH_INTERVAL},
    },
    # Writes the device sightings buffered in Redis to last_seen (devices.tasks).
    "flush-last-seen": {
        "task": "devices.tasks.flush_last_seen",
        "schedule": DEVICE_LAST_SEEN_FLUSH_INTERVAL,
        "options": {"expires": max(3 * DEVICE_LAST_SEEN_FLUSH_INTERVAL, 30.0)},
    },
    "evaluate-active-rollouts": {
        "task": "rollouts.tasks.evaluate_active_rollouts",
        "schedule": ROLLOUT_EVALUATION_INTERVAL,
        # Runs that wait too long are dropped rather than piling up behind a busy worker (each
        # one judges everything anew); but not so soon that a loaded worker never gets to one.
        "options": {"expires": max(10 * ROLLOUT_EVALUATION_INTERVAL, 30.0)},
    },
    # Moves sessions older than SESSION_ARCHIVE_DAYS to archive files (rollouts.archive).
    "archive-old-sessions": {
        "task": "rollouts.tasks.archive_old_sessions",
        "schedule": 24 * 3600,
        "options": {"expires": 12 * 3600},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celery" / "beat-schedule")

# --- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    # API keys first: DRF answers an unauthenticated request with the first class's challenge,
    # so it gets 401 + WWW-Authenticate rather than 403. Session writes need the CSRF token.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "ota_site.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    # Viewers read, operators write, admins delete; views that need more say so.
    "DEFAULT_PERMISSION_CLASSES": ["ota_site.permissions.RoleByMethod"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"]
    + (["rest_framework.renderers.BrowsableAPIRenderer"] if DEBUG else []),
    "DEFAULT_PAGINATION_CLASS": "ota_site.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "ota_site.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "OTA update server API",
    "DESCRIPTION": "Device, firmware and rollout API. Devices authenticate with a bearer JWT.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Every operation's error answers, in the one error shape (ota_site.schema).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "ota_site.schema.add_error_responses",
    ],
}

# --- Security headers and CORS ----------------------------------------------------------------
# Browsers may call the API cross-origin only from these origins (default: none); the console and
# admin are same-origin and never get CORS headers.
CORS_ALLOWED_ORIGINS = env.list("CORS_ALLOWED_ORIGINS", default=[])
CORS_URLS_REGEX = r"^/api/.*$"
CORS_ALLOW_CREDENTIALS = False  # cross-origin callers use API keys, not our session cookie
CORS_ALLOW_HEADERS = ("accept", "authorization", "content-type", "x-api-key", "x-request-id")
CORS_EXPOSE_HEADERS = ("retry-after", "x-request-id")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
if SECURE_PROXY_SSL_HEADER is not None:
    # Served over TLS by our proxy: browsers must never use plain HTTP again and cookies go only
    # over TLS. nginx redirects plain HTTP itself; Django's redirect stays opt-in, so health
    # probes and in-cluster calls over plain HTTP keep working.
    SECURE_HSTS_SECONDS = _typed("int", "SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = _typed("bool", "SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = _typed("bool", "SECURE_HSTS_PRELOAD", False)
    SECURE_SSL_REDIRECT = _typed("bool", "SECURE_SSL_REDIRECT", False)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

# --- Auth, i18n, logging --------------------------------------------------------------------
# Only the role groups grant Django permissions (ota_site.roles): a permission given to one user
# directly, or through another group, would let the admin disagree with the API.
AUTHENTICATION_BACKENDS = ["ota_site.roles.RoleModelBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"
# Where console pages open their WebSocket streams (/api/v1/stream/...): empty for this origin
# (nginx routes the streams to daphne), e.g. ws://127.0.0.1:8001 when daphne has its own port.
CONSOLE_STREAM_URL = env.str("CONSOLE_STREAM_URL", default="")
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# text: plain lines (the embedded mode's default); json: one JSON object per line with the
# request id (ota_site.logging), what log collectors want; .env.example sets it for production.
LOG_FORMAT = env.str("LOG_FORMAT", default="") or "text"
if LOG_FORMAT not in {"text", "json"}:
    CONFIG_ERRORS.append(("ota.E080", f"LOG_FORMAT={LOG_FORMAT!r} is not 'text' or 'json'."))
    LOG_FORMAT = "text"
# One line per request on the ota.access logger (method, route, status, duration, request id,
# client address); on by default with JSON logs, where it replaces gunicorn's access log.
ACCESS_LOG = _typed("bool", "ACCESS_LOG", LOG_FORMAT == "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "ota_site.logging.JsonFormatter"},
    },
    "filters": {"context": {"()": "ota_site.logging.ContextFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"] if LOG_FORMAT == "json" else [],
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}
