# One image for every server process: gunicorn (HTTP), daphne (WebSockets), the Celery worker and
# beat, and the one-shot migration. docker-compose.yml picks the command; docs/deployment.md says
# how they fit together.
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

# Dependencies first, so that a code change does not reinstall them: with only these two files
# present, `pip install .` installs the dependencies and an empty project.
COPY pyproject.toml README.md ./
RUN pip install .

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
# create the non-root user and its data folder (mounted as a volume by docker-compose.yml). The
# secret key given to collectstatic exists only for this step.
RUN pip install --no-deps . \
 && DJANGO_SECRET_KEY=collectstatic-only OTA_VAR_DIR=/tmp/ota-build \
    python manage.py collectstatic --noinput --verbosity 0 \
 && rm -rf /tmp/ota-build \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/ota --shell /usr/sbin/nologin ota \
 && install -d -o ota -g ota -m 0750 /var/lib/ota

USER ota

# 8000: gunicorn (HTTP). 8001: daphne (WebSockets).
EXPOSE 8000 8001

CMD ["gunicorn", "ota_site.wsgi", "--bind", "0.0.0.0:8000", "--workers", "4", \
     "--worker-class", "sync", "--worker-tmp-dir", "/dev/shm", "--access-logfile", "-", \
     "--no-control-socket"]
