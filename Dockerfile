# syntax=docker/dockerfile:1
# vaemap BIDS-App image: Python 3.11, the pinned stack from requirements.txt, PyTorch with CUDA.
#
#   docker build -t vaemap .
#   docker run --rm --gpus all -v /path/to/bids:/data:ro -v /path/to/out:/out vaemap /data /out participant
#
# Without --gpus, --device auto runs on the CPU. See README.md ("Containers and HPC").

# Base: the official Python 3.11 slim image, pinned by patch tag and by the digest of its
# multi-architecture index. Both stages use the same base, so the venv's interpreter symlink
# (/opt/venv/bin/python -> /usr/local/bin/python3.11) is valid in the runtime stage.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---------------------------------------------------------------------------------------------
# Stage 1: build the virtual environment.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# No pip configuration file is read here (none exists in the base image), so every package comes
# from the default index, PyPI. torch==2.13.0 there is the Linux x86_64 CUDA 13 build: its wheel
# depends on the CUDA wheels (nvidia-*-cu13, cuda-toolkit, triton: cuDNN, cuBLAS, the runtime,
# NCCL, ...) at versions its metadata pins (exactly, but for cuda-bindings, cuda-pathfinder and
# nvidia-nvjitlink, which are ranges), so the CUDA libraries come inside wheels, as FastSurfer
# does. No CUDA toolkit or driver is installed from elsewhere: the driver comes from the host
# (docker --gpus / NVIDIA Container Toolkit, apptainer --nv) and must support CUDA 13.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv

# The same install order as scripts/setup.sh: (1) every runtime pin, (2) the packages named on the
# "# no-deps:" line of requirements.txt (classic dmipy, whose own metadata cannot resolve on
# numpy 2), alone and without dependencies, (3) vaemap itself without dependencies (they are all
# in requirements.txt already; pyproject.toml reads its dependency list from that file).
COPY requirements.txt ./
RUN python -m pip install -r requirements.txt
RUN sed -n 's/^# no-deps: //p' requirements.txt > /tmp/requirements-no-deps.txt \
    && test -s /tmp/requirements-no-deps.txt \
    && python -m pip install --no-deps -r /tmp/requirements-no-deps.txt \
    && rm /tmp/requirements-no-deps.txt

COPY pyproject.toml setup.py README.md ./
COPY vaemap_bids ./vaemap_bids
RUN python -m pip install --no-deps --no-build-isolation .

# ---------------------------------------------------------------------------------------------
# Stage 2: the runtime image (no compilers, no build context, no pip cache).
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="vaemap" \
      org.opencontainers.image.description="BIDS-App: diffusion-MRI parameter maps (MS-DKI, ball-stick) with physics-informed VAEs, LSQ and self-supervised baselines" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/vaemap/vaemap" \
      org.opencontainers.image.url="https://github.com/vaemap/vaemap" \
      org.opencontainers.image.documentation="https://github.com/vaemap/vaemap#containers-and-hpc" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.authors="vaemap developers" \
      org.opencontainers.image.vendor="vaemap developers" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# - NIPYPE_NO_ET: no telemetry request at start-up (the container may run with --network none).
# - OMP/MKL/OPENBLAS_NUM_THREADS=1: Nipype runs several nodes at once (--nprocs); each node sets
#   its own thread count from --omp-nthreads, so a library that reads these variables on import
#   must not start one thread per core in every process.
# - HOME, MPLCONFIGDIR, DENO_DIR: writable for the image's user and for any `docker run -u UID`
#   (HOME is mode 1777); matplotlib's font cache and deno's cache (the BIDS validator) go to /tmp.
# - TEMPLATEFLOW_HOME: baked below and read-only at run time; no vaemap code fetches templates.
# - NVIDIA_*: what the NVIDIA Container Toolkit exposes to the container (compute = CUDA).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NIPYPE_NO_ET=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    DENO_DIR=/tmp/deno \
    DENO_NO_UPDATE_CHECK=1 \
    HOME=/home/vaemap \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --create-home --home-dir /home/vaemap --uid 1000 --user-group --shell /bin/bash vaemap \
    && chmod 1777 /home/vaemap

COPY --from=builder /opt/venv /opt/venv

# TemplateFlow: vaemap fetches no template (every map is in the subject's native space) and no
# vaemap module imports templateflow, but the stack ships it (niworkflows depends on it), and its
# import fills an empty TEMPLATEFLOW_HOME with the skeleton bundled in the wheel (no network); under
# a read-only home that import fails. Bake the skeleton now, so nothing is written there at run time.
# Then check that the console scripts start and that every vaemap module imports, and remove the
# caches those checks wrote as root, so that HOME and /tmp start empty for the run-time user.
RUN python -c "import templateflow.api" \
    && chmod -R a+rX /opt/templateflow \
    && vaemap --version \
    && python -c "import importlib, pkgutil, vaemap_bids; [importlib.import_module(m.name) for m in pkgutil.walk_packages(vaemap_bids.__path__, 'vaemap_bids.')]" \
    && bids-validator-deno --version \
    && rm -rf "$MPLCONFIGDIR" "$DENO_DIR" /home/vaemap/.cache

# Numeric, so that the host and Kubernetes' runAsNonRoot can resolve it (vaemap:vaemap).
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["vaemap"]
