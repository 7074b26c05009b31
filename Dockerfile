# lipstream on a CUDA GPU host:
#   docker build -t lipstream .
#   docker run -d --gpus all --restart unless-stopped -p 2160:2160 -v lipstream:/workspace lipstream
# The MuseTalk weights are downloaded into /workspace/models on first start (unless present);
# avatars live in /workspace/results, the API key in /workspace/api_key. Mount a volume (or a folder
# of yours, see the README) on /workspace to keep them.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# torch is pinned: the same release install.sh installs, as a CUDA build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LIPSTREAM_WORKSPACE=/workspace \
    LIPSTREAM_MODELS=/workspace/models \
    LIPSTREAM_AVATARS=/workspace/results \
    LIPSTREAM_HOST=0.0.0.0 \
    LIPSTREAM_PORT=2160 \
    HF_HOME=/workspace/.cache/huggingface \
    MPLCONFIGDIR=/workspace/.cache/matplotlib

# python3.12 + venv; espeak-ng for `lipstream demo`; curl for the health check
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev espeak-ng curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 lipstream \
    && mkdir -p /workspace/models /workspace/results /opt/lipstream/src \
    && chown -R lipstream:lipstream /workspace /opt/lipstream

WORKDIR /opt/lipstream/src
USER 10001

# 1. The dependencies, from pyproject.toml and install.sh only: this layer is rebuilt when they change,
#    not when the code does. A pinned CUDA torch first; install.sh then keeps it. No dev extras.
COPY --chown=lipstream:lipstream pyproject.toml install.sh ./
RUN python3 -m venv /opt/lipstream/venv \
    && /opt/lipstream/venv/bin/pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
    && LIPSTREAM_SKIP_APT=1 LIPSTREAM_VENV=/opt/lipstream/venv LIPSTREAM_EXTRAS='' LIPSTREAM_DEPS_ONLY=1 ./install.sh

# 2. lipstream itself.
COPY --chown=lipstream:lipstream . .
RUN /opt/lipstream/venv/bin/pip install --no-deps . \
    && /opt/lipstream/venv/bin/lipstream --version

ENV PATH=/opt/lipstream/venv/bin:$PATH
VOLUME ["/workspace"]
EXPOSE 2160
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${LIPSTREAM_PORT}/health || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/lipstream/src/docker/entrypoint.sh"]
