# megatron_navil for GPU clusters: NVIDIA's NGC PyTorch image + megatron-core (pinned) + this
# package with its C++ and CUDA extensions built for the cluster's GPUs.
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
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

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
      navil.transformer-engine="${TE_VERSION}" \
      navil.megatron-core="${MCORE_VERSION}" \
      navil.cuda-arch-list="${TORCH_CUDA_ARCH_LIST}"

ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=8 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# Non-unique IDs allowed: Ubuntu 24.04 images already have a user 1000 (ubuntu).
RUN groupadd --non-unique --gid "${USER_GID}" "${USERNAME}" \
 && useradd --non-unique --create-home --uid "${USER_UID}" --gid "${USER_GID}" \
      --shell /bin/bash "${USERNAME}"

WORKDIR /workspace/megatron_navil

# What the install reads first (its layer is rebuilt only when these change), then the same
# install script CI uses (.ci/run -> scripts/install.sh), in --system mode: into the image's
# Python, keeping NGC's CUDA torch, TE, flash-attn and apex (the NGC pip constraints file stays
# in force, so nothing replaces them); pip install --no-build-isolation -e ".[dev]" compiles
# megatron_navil._C and, with nvcc present, megatron_navil._C_cuda for TORCH_CUDA_ARCH_LIST.
COPY setup.py pyproject.toml README.md ./
COPY scripts/ scripts/
COPY csrc/ csrc/
COPY megatron_navil/ megatron_navil/
RUN bash scripts/install.sh --system \
 && rm -rf build /root/.cache/pip

COPY tools/ tools/
COPY examples/ examples/
COPY benchmarks/ benchmarks/
COPY tests/ tests/
RUN chown -R "${USER_UID}:${USER_GID}" /workspace/megatron_navil

USER ${USERNAME}
# The build-end check (cheap, no GPU needed): the versions this image really has, kept in
# image_env.json (`docker run IMAGE cat image_env.json`), then fail on a broken stack.
RUN python -m megatron_navil.env --json > image_env.json \
 && python -m megatron_navil.env --require native_ext cuda_ext megatron_core_matches_pin \
      transformer_engine_in_range flash_attn apex

ENTRYPOINT ["/workspace/megatron_navil/examples/container_entrypoint.sh"]
CMD []
