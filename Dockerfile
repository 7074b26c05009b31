# lipstream on a CUDA GPU host:
#   docker build -t lipstream .
#   docker run -d --gpus all --restart unless-stopped -p 2160:2160 -v lipstream:/workspace lipstream
# The MuseTalk weights are downloaded into /workspace/models on first start (unless present);
# avatars live in /workspace/results. Mount a volume on /workspace to keep both.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LIPSTREAM_MODELS=/workspace/models \
    LIPSTREAM_AVATARS=/workspace/results \
    LIPSTREAM_HOST=0.0.0.0 \
    LIPSTREAM_PORT=2160

# python3.12 + venv; espeak-ng for `lipstream demo`; curl for the health check
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev espeak-ng curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 lipstream \
    && mkdir -p /workspace/models /workspace/results /opt/lipstream \
    && chown -R lipstream:lipstream /workspace /opt/lipstream

WORKDIR /opt/lipstream/src
COPY --chown=lipstream:lipstream . .
USER 10001

# A CUDA build of torch first, in the venv install.sh then fills (it keeps a torch that imports).
RUN python3 -m venv /opt/lipstream/venv \
    && /opt/lipstream/venv/bin/pip install --index-url "$TORCH_INDEX" torch \
    && LIPSTREAM_SKIP_APT=1 LIPSTREAM_VENV=/opt/lipstream/venv ./install.sh

ENV PATH=/opt/lipstream/venv/bin:$PATH
VOLUME ["/workspace"]
EXPOSE 2160
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${LIPSTREAM_PORT}/health || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/lipstream/src/docker/entrypoint.sh"]
