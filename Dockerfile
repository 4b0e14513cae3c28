# One image for every server process: gunicorn (HTTP), daphne (WebSockets), the Celery worker and
# beat, and the one-shot jobs (migrate, the device CA bundle for nginx). docker-compose.yml picks
# the command; docs/deployment.md says how they fit together.
#
# The `otel` extra (OpenTelemetry, off until OTEL_ENABLED=true) is installed. HSM signing keys
# (FIRMWARE_SIGNING_BACKEND=pkcs11): the `hsm` extra (python-pkcs11) is installed; the vendor's PKCS#11 library is not. Add it in an image of your own,
#   FROM ota-server:local
#   COPY libvendor-pkcs11.so /opt/pkcs11/
# (with its own dependencies), or mount it read-only at /opt/pkcs11, and set
# PKCS11_MODULE=/opt/pkcs11/libvendor-pkcs11.so (docs/security.md#hsm-pkcs11).
FROM python:3.11-slim

# PYTHONPATH: import the project from /app, not from the copy pip puts in site-packages, because
# settings.py finds templates/ and static/ next to the ota_site package.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    OTA_VAR_DIR=/var/lib/ota \
    STATIC_ROOT=/app/staticfiles

WORKDIR /app

# pg_dump and pg_restore for `manage.py backup` (the same major version as the postgres service).
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first, so that a code change does not reinstall them: with only these two files
# present, `pip install .` installs the dependencies and an empty project.
COPY pyproject.toml README.md ./
RUN pip install ".[hsm,otel]"

# The application, copied folder by folder so that .env, .venv/, var/ and tests never enter the
# image.
COPY manage.py ./
COPY ota_site/ ota_site/
COPY devices/ devices/
COPY firmware/ firmware/
COPY rollouts/ rollouts/
COPY metrics/ metrics/
COPY templates/ templates/
COPY static/ static/

# Install the project itself, collect static files into the image (served by WhiteNoise), and
# create the non-root user and the folders docker-compose.yml mounts volumes on (a new volume
# takes the owner of the folder it is mounted on, so they must exist here, owned by ota). The
# secret key given to collectstatic exists only for this step.
RUN pip install --no-deps . \
 && DJANGO_SECRET_KEY=collectstatic-only OTA_VAR_DIR=/tmp/ota-build \
    python manage.py collectstatic --noinput --verbosity 0 \
 && rm -rf /tmp/ota-build \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/ota --shell /usr/sbin/nologin ota \
 && install -d -o ota -g ota -m 0750 /var/lib/ota \
 && install -d -o ota -g ota -m 0755 /var/lib/ota/media /etc/ota/ca

USER ota

# 8000: gunicorn (HTTP). 8001: daphne (WebSockets).
EXPOSE 8000 8001

CMD ["gunicorn", "ota_site.wsgi", "--bind", "0.0.0.0:8000", "--workers", "4", \
     "--worker-class", "sync", "--worker-tmp-dir", "/dev/shm", "--no-control-socket"]
