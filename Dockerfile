# gopdater in a container: one stdlib-only Python file plus the docker CLI and its Compose plugin.
#
# The docker CLI and Compose come from the official docker:<version>-cli image by COPY --from:
# both are static binaries there, pinned with that one tag, and Debian's packages carry neither a
# current CLI nor the Compose v2 plugin. Build-time ARGs let a mirror or a test supply the bases.
ARG PYTHON_IMAGE=python:3.13.9-slim-trixie
ARG DOCKER_CLI_IMAGE=docker:28.3.1-cli

FROM ${DOCKER_CLI_IMAGE} AS docker-cli

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="gopdater" \
      org.opencontainers.image.description="Receives registry push webhooks and updates the matching Docker Compose services" \
      org.opencontainers.image.version="1.4.0" \
      org.opencontainers.image.licenses="MIT"
COPY --from=docker-cli /usr/local/bin/docker /usr/local/bin/docker
COPY --from=docker-cli /usr/local/libexec/docker/cli-plugins/docker-compose /usr/local/libexec/docker/cli-plugins/docker-compose
COPY gopdater.py /app/gopdater.py
# Compiled once here: started from bytecode, gopdater holds about 8 MB less than when Python
# compiles the file at every start.
RUN ["python3", "-m", "compileall", "-q", "/app"]
# PYTHONSAFEPATH: -m gopdater must load /app's copy, never a gopdater.py in the mounted project folder.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PYTHONPATH=/app
WORKDIR /app
EXPOSE 8080
STOPSIGNAL SIGTERM
# With TLS_CERT set, PORT serves HTTPS only: the check speaks it too (to itself, so unverified).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('TLS_CERT')); c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; u.urlopen(('https' if tls else 'http') + '://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4, context=c if tls else None)"]
CMD ["python3", "-m", "gopdater"]
