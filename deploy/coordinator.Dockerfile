# The coordinator: CPU only (it stores, serves and evaluates the model; training happens on the
# clients). Build from the repository root:
#   docker build -f deploy/coordinator.Dockerfile -t fedcybgd-coordinator .
# Runs `fedcybgd coordinator --config /etc/fedcybgd/coordinator.toml`; mount a config there
# (deploy/config/coordinator.toml is the one docker-compose.yml uses), the model directory it
# names (/models/model) and a volume for the state (/var/lib/fedcybgd: blobs + SQLite; the same
# volume resumes the run). Health: the gRPC health service on :50051 (compose runs the check).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and alone, from the CPU index: asked for by the project, pip would pull the CUDA
# build (several GB the coordinator never uses).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Only what the package build needs (the rest of the checkout stays out of the image).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY server ./server
COPY client ./client
COPY cli ./cli
COPY protos ./protos
RUN pip install . && cd / && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group fedcybgd \
    && mkdir -p /var/lib/fedcybgd /etc/fedcybgd/tls \
    && chown fedcybgd:fedcybgd /var/lib/fedcybgd
USER fedcybgd
WORKDIR /home/fedcybgd
# A named volume mounted here starts with this directory's owner (the non-root user).
VOLUME ["/var/lib/fedcybgd"]

# 50051: gRPC (clients, `fedcybgd status`, health); 9464: Prometheus metrics.
EXPOSE 50051 9464
ENTRYPOINT ["fedcybgd"]
CMD ["coordinator", "--config", "/etc/fedcybgd/coordinator.toml"]
