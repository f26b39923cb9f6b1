# A client daemon on a CUDA GPU. Build from the repository root:
#   docker build -f deploy/client.Dockerfile -t fedcybgd-client .
# Runs `fedcybgd client --config /etc/fedcybgd/client.toml`; mount a config there
# (deploy/config/client.toml is the one docker-compose.yml uses), the site's data (/data,
# read-only) and a volume for the block cache (/var/cache/fedcybgd: blobs, identity, tokenizer;
# keep it across restarts). Give the container one GPU (compose: deploy.resources.reservations
# .devices; docker run: --gpus '"device=N"'): inside it that GPU is `cuda` (index 0).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The image's CUDA torch satisfies the project's `torch>=2.3`, so pip keeps it. nvidia-ml-py
# provides `pynvml`: the client then also exports the driver's view of GPU memory
# (fedcybgd_client_gpu_used_bytes, all processes on the device).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY server ./server
COPY client ./client
COPY cli ./cli
COPY protos ./protos
RUN pip install . nvidia-ml-py && cd / && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group fedcybgd \
    && mkdir -p /var/cache/fedcybgd /etc/fedcybgd/tls \
    && chown fedcybgd:fedcybgd /var/cache/fedcybgd
USER fedcybgd
WORKDIR /home/fedcybgd
VOLUME ["/var/cache/fedcybgd"]

# 9465: Prometheus metrics (the client only dials out for gRPC).
EXPOSE 9465
ENTRYPOINT ["fedcybgd"]
CMD ["client", "--config", "/etc/fedcybgd/client.toml"]
