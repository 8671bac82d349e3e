# syntax=docker/dockerfile:1.7
# One image for every exaconnect service (the command picks the queue), in three flavours:
#   docker build -t exaconnect:0.1.0-cpu .                                (CPU)
#   docker build --build-arg FLAVOUR=xpu -t exaconnect:0.1.0-xpu .        (Intel GPUs, Aurora: TF 2.15 + ITEX)
#   docker build --build-arg FLAVOUR=nvidia -t exaconnect:0.1.0-nvidia .  (NVIDIA GPUs, Polaris)
#   docker run exaconnect:0.1.0-cpu queue work fq:///data/queues/mesh --heartbeat /tmp/exaconnect/heartbeat
# Dependencies: exactly deploy/lock/FLAVOUR.txt (wheels only: pip never compiles), installed
# before the code is copied, by deploy/install.sh (the Apptainer definition deploy/exaconnect.def
# runs the same script). The cpu and nvidia bases have no compiler; the oneAPI base of xpu ships
# build-essential, cmake, git and openssh-server, which install.sh system-xpu removes. It keeps
# the base's own Intel GPU apt source. The image runs as uid 10001. XPU specifics stay in this
# flavour and in ffn/device.py.
ARG FLAVOUR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# ITEX 2.15 needs the oneAPI 2024.1 runtime (this image) and the Level Zero GPU driver (added below).
ARG ONEAPI_IMAGE=intel/oneapi-runtime:2024.1.0-devel-ubuntu22.04

FROM ${PYTHON_IMAGE} AS base-cpu

# CUDA libraries come from the lock's nvidia-* wheels (tensorflow[and-cuda]); the driver from the host.
FROM ${PYTHON_IMAGE} AS base-nvidia
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${ONEAPI_IMAGE} AS base-xpu
COPY deploy/install.sh /tmp/install.sh
RUN sh /tmp/install.sh system-xpu && rm /tmp/install.sh

# hadolint ignore=DL3006
FROM base-${FLAVOUR}
ARG FLAVOUR
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    TF_CPP_MIN_LOG_LEVEL=2 \
    EXACONNECT_FLAVOUR=${FLAVOUR} \
    EXACONNECT_HEARTBEAT=/tmp/exaconnect/heartbeat
COPY deploy/install.sh /opt/exaconnect/deploy/install.sh
COPY deploy/lock/${FLAVOUR}.txt /opt/exaconnect/deploy/lock/${FLAVOUR}.txt
RUN sh /opt/exaconnect/deploy/install.sh deps /opt/exaconnect/deploy/lock/${FLAVOUR}.txt
WORKDIR /opt/exaconnect
COPY pyproject.toml README.md ./
COPY exaconnect exaconnect
COPY precomputed precomputed
COPY services services
COPY ffn ffn
COPY align align
COPY viewer viewer
COPY montage montage
COPY deploy/healthcheck.sh /usr/local/bin/exaconnect-healthcheck
RUN sh deploy/install.sh project /opt/exaconnect \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/exa exa
USER 10001:10001
WORKDIR /home/exa
# caches and ~/.cloudvolume go under /tmp: with a read-only root (`docker run --read-only --tmpfs /tmp`,
# the Helm chart's readOnlyRootFilesystem) /tmp is the one writable place; the chart sets the same
ENV HOME=/tmp/home
HEALTHCHECK --interval=60s --timeout=10s --start-period=120s CMD ["exaconnect-healthcheck", "--if-present"]
ENTRYPOINT ["exaconnect"]
CMD ["--help"]
