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
# /keys: a fresh named volume mounted there takes this owner and mode
RUN pip install '.[gateway]' \
    && useradd --system --uid 10001 --home-dir /app loadsvc \
    && mkdir -p /keys && chown loadsvc:loadsvc /keys && chmod 0700 /keys
COPY examples ./examples

USER loadsvc
# gRPC, REST, ZMQ collector
EXPOSE 50051 8000 5557
CMD ["loadsvc", "--help"]
