# rcm-nddr on a CUDA PyTorch image. Build and run with the Docker SDK wrapper (which also records the
# git commit and mounts the host folders as the host user):
#
#   rcm-nddr docker build --tag rcm-nddr:latest
#   rcm-nddr docker run --gpus all --data data --results results --ri RI --models ~/.cache/torch \
#       -- python train.py --config configs/NYUD/semseg_RC_RI_NFF.yaml
#
# or with the plain docker CLI:
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t rcm-nddr:latest .
#   docker run --rm --init --gpus all --shm-size 8g --user "$(id -u):$(id -g)" \
#       -v "$PWD/data:/rcm-nddr/data:ro" -v "$PWD/results:/rcm-nddr/results" \
#       -v "$PWD/RI:/rcm-nddr/RI" -v "$HOME/.cache/torch:/rcm-nddr/models" \
#       rcm-nddr:latest python train.py --config configs/NYUD/semseg_RC_RI_NFF.yaml
#
# Mount points (relative config paths resolve against the working directory /rcm-nddr, so the
# configs' data/... and results/... paths land in the mounts):
#   /rcm-nddr/data     datasets, read-only (data/SYNTH_MT, data/NYUD_MT, data/PASCAL_MT ...)
#   /rcm-nddr/results  model stores, runs, checkpoints, metrics (read-write)
#   /rcm-nddr/RI       RI decompositions (--set backbone.decomposition=RI/<file>.safetensors)
#   /rcm-nddr/models   TORCH_HOME: torchvision ImageNet weights in hub/checkpoints/ (the layout of
#                      ~/.cache/torch), and filter banks referenced as models/<file>
#
# The base image must provide Python >= 3.10 with torch (2.2 ... 2.14.1) and torchvision
# (0.17 ... 0.29.1) installed, so that `pip install .` keeps them. It is only built locally here
# (no registry is involved in the build besides pulling the base).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# HOME: the container runs as the host user's uid:gid, which has no passwd entry and no home; every
# tool that writes caches or configs under $HOME (triton, torch.compile, tensorboard) gets /tmp.
# USER/LOGNAME: getpass.getuser() reads them before looking the uid up in the passwd database.
# TORCH_HOME: torch.hub.get_dir() = $TORCH_HOME/hub, where backbone.weights=torchvision looks for
# hub/checkpoints/resnet<N>-<hash>.pth.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    USER=rcm-nddr \
    LOGNAME=rcm-nddr \
    TORCH_HOME=/rcm-nddr/models

WORKDIR /rcm-nddr

# The package first (a non-editable install of a copy of the source, which is removed afterwards; the
# base's torch satisfies the requirement and is kept), then the configs and entry points, which change
# more often. The source must not stay in the working directory: python train.py puts /rcm-nddr first on
# the import path, where rcm_nddr/ would shadow the installed package and its rcm_nddr.tasks and
# rcm_nddr.decomp, which install from the top-level folders tasks/ and decomp/.
COPY pyproject.toml README.md /tmp/rcm-nddr-src/
COPY rcm_nddr/ /tmp/rcm-nddr-src/rcm_nddr/
COPY tasks/ /tmp/rcm-nddr-src/tasks/
COPY decomp/ /tmp/rcm-nddr-src/decomp/
RUN pip install --no-cache-dir /tmp/rcm-nddr-src \
    && rm -rf /tmp/rcm-nddr-src \
    && python -c "import rcm_nddr, rcm_nddr.tasks, rcm_nddr.decomp, torch, torchvision; print('rcm-nddr', rcm_nddr.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    && mkdir -p data results RI models \
    && chmod 1777 data results RI models

COPY configs/ configs/
COPY train.py test.py ./

# Provenance: the source commit (no .git in the image) and the base, filled by `rcm-nddr docker
# build` from the host's git; declared last so a new commit does not invalidate the install layer.
ARG BASE_IMAGE
ARG GIT_COMMIT=unknown
ARG GIT_DIRTY=unknown
ARG VERSION=0.1.0
ENV RCM_NDDR_GIT_COMMIT=${GIT_COMMIT} \
    RCM_NDDR_GIT_DIRTY=${GIT_DIRTY}
LABEL org.opencontainers.image.title="rcm-nddr" \
      org.opencontainers.image.description="Incremental multi-task dense prediction: a frozen filter bank with per-task modulators (RCM) and NDDR fusion" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

VOLUME ["/rcm-nddr/data", "/rcm-nddr/results", "/rcm-nddr/RI", "/rcm-nddr/models"]
CMD ["rcm-nddr", "--help"]
