# loadsvc image for the multi-node demo (docker-compose.yml): the project installed
# with pip from this repository (with the smg gateway for the `gateway` service),
# run as an unprivileged user.
#   docker compose up --build
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY loadsvc ./loadsvc
# gcc for loadsvc.core._shmfast (the C read loop of the shared-memory reader), removed
# again after the install; /keys: a fresh named volume mounted there takes this
# owner and mode
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install '.[gateway]' \
    && (cd / && python -c "import loadsvc.core._shmfast") \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app loadsvc \
    && mkdir -p /keys && chown loadsvc:loadsvc /keys && chmod 0700 /keys
COPY examples ./examples

USER loadsvc
# gRPC, REST, ZMQ collector
EXPOSE 50051 8000 5557
CMD ["loadsvc", "--help"]
