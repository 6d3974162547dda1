# megatron_navil for GPU clusters: NVIDIA's NGC PyTorch image + megatron-core (pinned) + this
# package with its C++ and CUDA extensions built for the cluster's GPUs.
# A CPU build of the same file (NAVIL_GPU=0, on a Debian + Python base) is what .ci/image builds
# and tests here, without a Docker engine: see docs/cluster.md.
#
#   docker build -t megatron-navil:latest .
#   docker build --build-arg TORCH_CUDA_ARCH_LIST="9.0" -t megatron-navil:h100 .   # H100 only
#   docker run --gpus all --ipc=host megatron-navil:latest pretrain_navil_2b.sh --dry-run
#   enroot import -o megatron-navil.sqsh dockerd://megatron-navil:latest   # for pyxis (SLURM)
#
# The base tag fixes the GPU stack. nvcr.io/nvidia/pytorch:25.12-py3, per NVIDIA's release notes
# for 25.12: Ubuntu 24.04, Python 3.12, CUDA 13.1.0, PyTorch 2.10.0a0+b4e4ee81d3, with
# TransformerEngine, flash-attn and apex preinstalled. TE_VERSION below is the TransformerEngine
# release that tag is documented to carry; it lies in the range megatron-core 0.16.1 declares
# (transformer-engine >=2.9.0a0,<2.12.0; tests/unit/test_dockerfile.py checks the two agree).
# flash-attn and apex are the builds the tag ships; the build writes every version it finds to
# image_env.json. No Docker engine or GPU was available where this file was written, so the
# build verifies instead of trusting the notes: its last step fails unless the installed TE is
# in megatron-core's range, flash-attn and apex are present, megatron-core is the pinned version
# and both extensions import. Another tag: --build-arg BASE_IMAGE=... (and TE_VERSION to match).
#
# Two paths, chosen by NAVIL_GPU:
#   NAVIL_GPU=1 (default): the NGC base above. Its torch, TE, flash-attn and apex are kept: this
#     path never installs torch, and the build fails unless the GPU-only parts are there.
#   NAVIL_GPU=0: the CPU image. BASE_IMAGE names a Debian + Python 3.11 base whose python3 is a
#     virtualenv on PATH (.ci/image makes one with debootstrap); torch 2.13.0, the CPU build, is
#     installed first from TORCH_WHEELS (a find-links directory or page holding the
#     torch-2.13.0+cpu wheel; only that exact +cpu version is accepted, so no install can pull
#     PyPI's CUDA torch), then pinned for the rest of the install like scripts/install.sh does;
#     the compiler it needs is removed again in the same step. The GPU-only checks are skipped.
#   buildah build --isolation chroot --build-arg BASE_IMAGE=localhost/navil-base:bookworm-py311 \
#     --build-arg NAVIL_GPU=0 --volume /opt/wheels:/wheels:ro -t megatron-navil:cpu .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}
# An ARG declared before FROM is out of scope after it: re-declared so the label below gets it.
ARG BASE_IMAGE

# 1: the NGC (GPU) path; 0: the CPU path (see above). Anything else fails the build.
ARG NAVIL_GPU=1
# CPU path only: the torch it installs (scripts/install.sh's pin; tests/unit/test_dockerfile.py
# checks the two agree) and where the +cpu wheel is found.
ARG TORCH_VERSION=2.13.0
ARG TORCH_WHEELS=https://download.pytorch.org/whl/cpu/torch/
# Both paths, optional: a CA bundle file visible to the build (e.g. mounted with buildah build
# --volume) that pip trusts, for builds behind a TLS-intercepting proxy. Not kept in the image.
ARG CA_BUNDLE=
ARG TE_VERSION=2.10
# megatron-core: the version megatron_navil/__init__.py pins (MCORE_VERSION; setup.py reads it
# from there and installs exactly that). Here for the record and the image label.
ARG MCORE_VERSION=0.16.1
# GPU architectures the CUDA extension is compiled for: A100 (8.0) and H100/H200 (9.0).
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
# The user the image runs as (match the cluster's UID/GID for files written to mounts).
ARG USERNAME=navil
ARG USER_UID=1000
ARG USER_GID=1000

LABEL org.opencontainers.image.title="megatron_navil" \
      org.opencontainers.image.description="Megatron-core trainer for NaViL" \
      navil.base-image="${BASE_IMAGE}" \
      navil.gpu="${NAVIL_GPU}" \
      navil.transformer-engine="${TE_VERSION}" \
      navil.megatron-core="${MCORE_VERSION}" \
      navil.cuda-arch-list="${TORCH_CUDA_ARCH_LIST}"

ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=8 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NAVIL_SYSTEM_INSTALL=1

# Non-unique IDs allowed: Ubuntu 24.04 images already have a user 1000 (ubuntu).
RUN groupadd --non-unique --gid "${USER_GID}" "${USERNAME}" \
 && useradd --non-unique --create-home --uid "${USER_UID}" --gid "${USER_GID}" \
      --shell /bin/bash "${USERNAME}"

WORKDIR /workspace/megatron_navil

# What the install reads first (its layer is rebuilt only when these change), then the same
# install script CI uses (.ci/run -> scripts/install.sh), in --system mode: into the image's
# Python. GPU path: keeping NGC's CUDA torch, TE, flash-attn and apex (the NGC pip constraints
# file stays in force, so nothing replaces them); pip install --no-build-isolation -e ".[dev]"
# compiles megatron_navil._C and, with nvcc present, megatron_navil._C_cuda for
# TORCH_CUDA_ARCH_LIST. CPU path: first g++ and the Python headers (removed again at the end of
# this step, so no layer keeps them; libgomp1 stays, _C links it) and torch==TORCH_VERSION+cpu,
# then the same install with torch pinned by a constraints file (NAVIL_SYSTEM_INSTALL=1 tells
# scripts/install.sh, test.sh and the examples to use this python3 instead of making a .venv).
COPY setup.py pyproject.toml README.md ./
COPY scripts/ scripts/
COPY csrc/ csrc/
COPY megatron_navil/ megatron_navil/
RUN set -eu; \
    case "${NAVIL_GPU}" in 0|1) ;; *) echo "NAVIL_GPU must be 0 or 1, not ${NAVIL_GPU}" >&2; exit 1;; esac; \
    export PIP_NO_CACHE_DIR=1; \
    if [ -n "${CA_BUNDLE}" ]; then export PIP_CERT="${CA_BUNDLE}"; fi; \
    if [ "${NAVIL_GPU}" = 0 ]; then \
      apt-get update -qq; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        g++ python3-dev libgomp1 > /dev/null; \
      python3 -m pip install -q --disable-pip-version-check --find-links "${TORCH_WHEELS}" \
        "torch==${TORCH_VERSION}+cpu"; \
      echo "torch==${TORCH_VERSION}+cpu" > /tmp/torch-constraint.txt; \
      export PIP_CONSTRAINT=/tmp/torch-constraint.txt; \
    fi; \
    bash scripts/install.sh --system; \
    if [ "${NAVIL_GPU}" = 0 ]; then \
      python3 -c "import torch; assert torch.__version__ == '${TORCH_VERSION}+cpu' and torch.version.cuda is None, torch.__version__"; \
      DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --auto-remove g++ python3-dev > /dev/null; \
      rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    fi; \
    rm -rf build /root/.cache /tmp/*

COPY tools/ tools/
COPY examples/ examples/
COPY benchmarks/ benchmarks/
COPY tests/ tests/
# What tests/unit/test_dockerfile.py reads (the image's tests check the image's own recipe).
COPY Dockerfile .dockerignore ./
COPY .ci/ .ci/
RUN chown -R "${USER_UID}:${USER_GID}" /workspace/megatron_navil

USER ${USERNAME}
# The build-end check (cheap, no GPU needed): the versions this image really has, kept in
# image_env.json (`docker run IMAGE cat image_env.json`) and every installed distribution's
# exact version in image_pip_freeze.txt (to rebuild the same stack: pip install -c it), then
# fail on a broken stack. The GPU path requires the GPU-only parts; the CPU path cannot have them.
RUN python -m megatron_navil.env --json > image_env.json \
 && python -m pip freeze --all --exclude-editable > image_pip_freeze.txt \
 && if [ "${NAVIL_GPU}" = 1 ]; then \
      python -m megatron_navil.env --require native_ext cuda_ext megatron_core_matches_pin \
        transformer_engine_in_range flash_attn apex; \
    else \
      python -m megatron_navil.env --require native_ext megatron_core_matches_pin; \
    fi

ENTRYPOINT ["/workspace/megatron_navil/examples/container_entrypoint.sh"]
CMD []
