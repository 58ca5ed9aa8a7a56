# The stablews service image: `docker build -t stablews:0.1.0 .` (docker-compose.yml builds it).
# Python pinned to a patch release; the package and its console script come from pyproject.toml.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY service ./service
# service/stablews/web/client/stablews.js is a link to the browser client here.
COPY clients ./clients
RUN pip install --no-cache-dir . \
    && rm -rf /build

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/stablews --shell /usr/sbin/nologin stablews
USER 10001:10001
WORKDIR /home/stablews

EXPOSE 8000

# Readiness, not liveness: /readyz answers 503 while starting and draining. No curl in slim images.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]

# Loopback is the default host: listen on every interface inside the container.
CMD ["stablews", "serve", "--host", "0.0.0.0", "--port", "8000"]
