#!/usr/bin/env bash
# Docker smoke test of rcm-nddr, for machines that reach the package registries but no image registry:
#
#   1. engine   a Docker engine answers (started here when none does: dockerd, installed with apt when
#               missing and running as root);
#   2. base     a local stand-in for the CUDA PyTorch base image (unless it exists): a Debian bookworm
#               rootfs made by debootstrap, imported, with torch and torchvision installed into
#               /opt/venv by pip with the host's pip settings (the files and folders they name
#               mounted read-only), then committed;
#   3. image    `rcm-nddr docker build` of the project on that base;
#   4. data     a tiny SYNTH_MT and a torchvision-format ResNet-18 checkpoint (random weights) in the
#               models folder, on the host;
#   5. train    `rcm-nddr docker run ... -- python train.py` (RC + RI + NFF semseg, a few iterations,
#               backbone.weights=torchvision read from the models mount, the RI decomposition written
#               to the RI mount) with no network;
#   6. test     `rcm-nddr docker run ... -- python test.py`;
#   7. preempt  SIGTERM to a `rcm-nddr docker run` of a long training: the container is stopped with a
#               grace period, training writes its checkpoint and the exit status is 143;
#   8. checks   on the host: store.yaml lists the task, `rcm-nddr store verify` passes, every result
#               file belongs to the uid the container ran as (a non-root uid when this script runs as
#               root, plus a check of the default mapping to the calling user), test_metrics.json
#               exists, and env.json records the image id and the commit.
#
#   9. e2e      (with --e2e) the test suite's end-to-end Docker test against the image:
#               RCM_NDDR_TEST_IMAGE=<image> pytest -m docker tests/test_docker.py
#
# Usage: scripts/docker-smoke.sh [--e2e] [--clean] [--stop-engine] [--skip-without-engine] [--keep-work]
#   --e2e                  also run the end-to-end test of the test suite in the image (stage 9)
#   --clean                remove the smoke images at the end (default: keep them, so the next run is warm)
#   --stop-engine          stop the dockerd this script started, if it started one (default: leave it running)
#   --skip-without-engine  where no engine runs and none can be started (not root, no dockerd, dockerd
#                          fails), say why and exit 0 instead of failing (what CI does)
#   --keep-work            keep the temporary work folder (data, results) for inspection
# Environment:
#   RCM_NDDR (default .venv/bin/rcm-nddr), PYTHON (default .venv/bin/python)
#   SMOKE_BASE_IMAGE (rcm-nddr-base:smoke), SMOKE_IMAGE (rcm-nddr:smoke)
#   SMOKE_USER       uid:gid the containers run as when this script runs as root (default 4242:4242)
#   SMOKE_PIP_DIRS   more local wheel folders mounted read-only into the base build (default: none). The
#                    host's pip settings are passed along, each file or folder they name mounted
#                    read-only where it exists and left out, with a note, where it does not
#   SMOKE_TORCH      packages of the stand-in base (default: torch==2.14.1 torchvision==0.29.1)
#   DEBIAN_MIRROR    debootstrap mirror (default: the first URI of this machine's apt sources)
#   DOCKERD_LOG      log of a dockerd started here (default: /var/log/rcm-nddr-smoke-dockerd.log)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RCM_NDDR=${RCM_NDDR:-$ROOT/.venv/bin/rcm-nddr}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BASE_IMAGE=${SMOKE_BASE_IMAGE:-rcm-nddr-base:smoke}
IMAGE=${SMOKE_IMAGE:-rcm-nddr:smoke}
SMOKE_TORCH=${SMOKE_TORCH:-torch==2.14.1 torchvision==0.29.1}
SMOKE_PIP_DIRS=${SMOKE_PIP_DIRS:-}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/rcm-nddr-smoke-dockerd.log}
CONTAINER_PREFIX=rcm-nddr-smoke
CLEAN=0
KEEP_WORK=0
E2E=0
STOP_ENGINE=0
SKIP_WITHOUT_ENGINE=0
DOCKERD_PID=""
for arg in "$@"; do
    case $arg in
        --clean) CLEAN=1 ;;
        --e2e) E2E=1 ;;
        --stop-engine) STOP_ENGINE=1 ;;
        --skip-without-engine) SKIP_WITHOUT_ENGINE=1 ;;
        --keep-work) KEEP_WORK=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "docker-smoke: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

STAGE=setup
T_START=$(date +%s)
T_STAGE=$T_START
TIMINGS=()
WORK=""

say() { echo "docker-smoke: $*"; }
fail() { echo "docker-smoke: FAILED in stage '$STAGE': $*" >&2; exit 1; }
stage() {  # close the running stage (its time is recorded) and open the next
    local now
    now=$(date +%s)
    if [ "$STAGE" != setup ]; then
        TIMINGS+=("$(printf '%-8s %5d s' "$STAGE" $((now - T_STAGE)))")
        say "stage $STAGE done in $((now - T_STAGE)) s"
    fi
    STAGE=$1
    T_STAGE=$now
    say "== $STAGE: $2"
}
cleanup() {
    local status=$?
    set +e
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        docker ps -aq --filter "name=^$CONTAINER_PREFIX" | xargs -r docker rm -f >/dev/null
    fi
    if [ "$STOP_ENGINE" = 1 ] && [ -n "$DOCKERD_PID" ]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        say "stopped the dockerd it started (pid $DOCKERD_PID)"
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP_WORK" = 1 ]; then say "work folder kept: $WORK"; else rm -rf "$WORK"; fi
    fi
    if [ $status -ne 0 ]; then
        echo "docker-smoke: FAILED in stage '$STAGE' (exit status $status) after $(($(date +%s) - T_START)) s" >&2
    fi
}
trap cleanup EXIT

[ -x "$RCM_NDDR" ] || fail "$RCM_NDDR not found: run make venv (or set RCM_NDDR)"
"$PYTHON" -c "import docker" 2>/dev/null || fail "the Docker SDK is missing in $PYTHON: pip install -e '.[dev]'"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rcm-nddr-smoke.XXXXXX")
chmod 755 "$WORK"

# ----------------------------------------------------------------------------- 1. engine
stage engine "a Docker engine that answers"
no_engine() {  # no engine can be had here: a failure, or with --skip-without-engine a skip
    if [ "$SKIP_WITHOUT_ENGINE" = 1 ]; then
        say "SKIPPED: $1"
        exit 0
    fi
    fail "$1"
}
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    [ "$(id -u)" = 0 ] || no_engine "no docker/dockerd here and not root: install Docker (apt-get install docker.io)"
    say "installing docker.io"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null; } \
        || no_engine "apt-get install docker.io failed"
fi
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || no_engine "no Docker engine answers and only root can start one here (or add yourself to the docker group)"
    say "starting dockerd (log: $DOCKERD_LOG)"
    # No iptables and no default bridge: this machine's sandbox allows neither; the smoke's builds use
    # the host network and its containers none.
    setsid nohup dockerd --storage-driver=overlay2 --iptables=false --bridge=none >>"$DOCKERD_LOG" 2>&1 </dev/null &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -5 "$DOCKERD_LOG" >&2; no_engine "dockerd did not answer within 60 s; see $DOCKERD_LOG"; }
fi
say "engine: Docker $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}')"

# ----------------------------------------------------------------------------- 2. base
stage base "the stand-in base image $BASE_IMAGE"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "$BASE_IMAGE exists: reused (remove it, or run with --clean, for a cold run)"
else
    [ "$(id -u)" = 0 ] || fail "building $BASE_IMAGE needs root (debootstrap); build it once as root"
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null || fail "apt-get install debootstrap failed"
    fi
    available=$(df -Pk /var/lib/docker "$WORK" 2>/dev/null | awk 'NR > 1 {print int($4 / 1048576)}' | sort -n | head -1)
    [ "${available:-0}" -ge 15 ] || say "warning: ${available:-?} GiB free; the base and project images need about 15 GiB"
    mirror=${DEBIAN_MIRROR:-$(grep -hoE '^URIs: *http[^ ]*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | sed 's/^URIs: *//')}
    mirror=${mirror:-$(grep -hoE '^deb +http[^ ]*/debian/? +bookworm' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')}
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$WORK/rootfs
    say "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1 \
        bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed (log above)"; }
    # This machine reaches PyPI through a TLS-intercepting proxy: the stand-in trusts the same local
    # CAs as the host (a real base image on a normal network needs nothing of the kind).
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >>"$WORK/debootstrap.log" 2>&1 || fail "update-ca-certificates in the rootfs failed"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    say "importing the rootfs ($(du -sh "$rootfs" | cut -f1))"
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE-os" >/dev/null
    rm -rf "$rootfs"
    # The host's pip settings for this one pip call (rcm_nddr.commands.pip_settings): the files and folders
    # they name (constraints, wheel folders, local indexes) mounted read-only at the same place where they
    # exist, left out with the reason where they do not. They are set in the command, not with
    # `docker run -e`: `docker commit` would bake the container's environment (paths that exist on this
    # machine only) into the image.
    mounts=()
    quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
    pip_env=""
    while IFS=$'\t' read -r kind first second; do
        case $kind in
            MOUNT) mounts+=(-v "$first:$first:ro") ; say "pip: mounting $first read-only" ;;
            ENV) pip_env+=" $first=$(quote "$second")" ;;
            NOTE) say "pip: $first" ;;
        esac
    done < <("$PYTHON" -m rcm_nddr.commands.pip_settings)
    for dir in $SMOKE_PIP_DIRS; do
        if [ -d "$dir" ]; then mounts+=(-v "$dir:$dir:ro"); else say "pip: SMOKE_PIP_DIRS folder $dir does not exist: skipped"; fi
    done
    say "installing $SMOKE_TORCH into /opt/venv"
    docker run --name "$CONTAINER_PREFIX-base" --network host "${mounts[@]}" "$BASE_IMAGE-os" sh -ec \
        "python3 -m venv /opt/venv
         env$pip_env /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --progress-bar off $SMOKE_TORCH
         /opt/venv/bin/python -c 'import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__)'" \
        >"$WORK/base-pip.log" 2>&1 || { tail -30 "$WORK/base-pip.log" >&2; fail "installing torch in the base failed (log above)"; }
    tail -1 "$WORK/base-pip.log"
    docker commit --change 'CMD ["python3"]' \
        --change 'LABEL org.opencontainers.image.title="rcm-nddr smoke base" org.opencontainers.image.description="Debian bookworm + torch in /opt/venv: a local stand-in for a CUDA PyTorch image"' \
        "$CONTAINER_PREFIX-base" "$BASE_IMAGE" >/dev/null
    docker rm "$CONTAINER_PREFIX-base" >/dev/null
    docker rmi "$BASE_IMAGE-os" >/dev/null  # the tag only: its layer is the base's first
fi
say "$BASE_IMAGE: $(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"

# ----------------------------------------------------------------------------- 3. image
stage image "rcm-nddr docker build --tag $IMAGE"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)  # what the build records (a commit made meanwhile is not)
PREVIOUS_ID=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
"$RCM_NDDR" docker build --base-image "$BASE_IMAGE" --tag "$IMAGE" --network host >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; fail "rcm-nddr docker build failed (log above)"; }
grep -E 'Step [0-9]+/|built ' "$WORK/build.log" | sed 's/^/  /'
IMAGE_ID=$(docker image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$PREVIOUS_ID" ] && [ "$PREVIOUS_ID" != "$IMAGE_ID" ]; then  # the rebuilt tag's old image: 6 GB left dangling
    docker rmi "$PREVIOUS_ID" >/dev/null 2>&1 && say "removed the previous $IMAGE ($PREVIOUS_ID)"
fi
say "$IMAGE: $IMAGE_ID, $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"

# ----------------------------------------------------------------------------- 4. data
stage data "tiny SYNTH_MT and a torchvision-format ResNet-18 on the host"
mkdir -p "$WORK/data" "$WORK/results" "$WORK/RI" "$WORK/models/hub/checkpoints"
"$RCM_NDDR" data synth --out "$WORK/data/SYNTH_MT" --train 6 --val 2 --size 48 48 --quiet
# Random weights in torchvision's file layout: what backbone.weights=torchvision reads from TORCH_HOME.
"$PYTHON" -c "
import sys, torch, torchvision
from rcm_nddr.nn.backbone import torchvision_weights_path
name = torchvision_weights_path('resnet18').name
torch.manual_seed(0)
torch.save(torchvision.models.resnet18().state_dict(), sys.argv[1] + '/' + name)
print(name)" "$WORK/models/hub/checkpoints" >"$WORK/weights.txt"
if [ "$(id -u)" = 0 ]; then
    RUN_AS=${SMOKE_USER:-4242:4242}
    # The folders of a user with that uid, as they would have them on a shared machine.
    chown -R "$RUN_AS" "$WORK/results" "$WORK/RI" "$WORK/models"
else
    RUN_AS=$(id -u):$(id -g)
fi
say "containers run as $RUN_AS"

STORE=results/smoke/store
CONFIG=configs/synthetic/semseg_RC_RI_NFF.yaml
SETTINGS=(
    --set "store=$STORE"
    --set backbone.weights=torchvision
    --set backbone.decomposition=RI/smoke_ri.safetensors
    --set "dataset.crop=[48, 48]"
    --set head.channels=8
    --set train.batch_size=2
    --set train.num_workers=0
    --set train.max_iters=4
    --set train.val_every=4
    --set train.device=cpu
    --set test.batch_size=2
    --quiet
)
# the smoke's `rcm-nddr docker run` options (each run adds --name)
RUN_OPTIONS=(--image "$IMAGE" --network none --user "$RUN_AS" --data "$WORK/data" --results "$WORK/results"
    --ri "$WORK/RI" --models "$WORK/models" --shm-size 1g)
docker_run() {  # docker_run NAME COMMAND...
    local name=$1
    shift
    "$RCM_NDDR" docker run "${RUN_OPTIONS[@]}" --name "$CONTAINER_PREFIX-$name" -- "$@"
}

# ----------------------------------------------------------------------------- 5. train
stage train "python train.py --config $CONFIG in the container"
docker_run train python train.py --config "$CONFIG" "${SETTINGS[@]}" >"$WORK/train.log" 2>&1 \
    || { tail -40 "$WORK/train.log" >&2; fail "training in the container failed (log above)"; }
grep -E 'loaded backbone weights|wrote the decomposition|registered|iteration' "$WORK/train.log" | sed 's/^/  /'

# ----------------------------------------------------------------------------- 6. test
stage test "python test.py --config $CONFIG in the container"
docker_run test python test.py --config "$CONFIG" "${SETTINGS[@]}" >"$WORK/test.log" 2>&1 \
    || { tail -40 "$WORK/test.log" >&2; fail "testing in the container failed (log above)"; }
grep -E 'rcm_nddr.engine.tester' "$WORK/test.log" | sed 's/^/  /'

# ----------------------------------------------------------------------------- 7. preempt
stage preempt "SIGTERM to rcm-nddr docker run while training: a checkpoint, then exit status 143"
"$RCM_NDDR" docker run "${RUN_OPTIONS[@]}" --name "$CONTAINER_PREFIX-preempt" --stop-timeout 60 -- \
    python train.py --config configs/synthetic/semseg_single_task.yaml "${SETTINGS[@]}" \
    --set store=results/smoke/preempt --set backbone.weights=none \
    --set train.max_iters=100000 --set train.val_every=100000 >"$WORK/preempt.log" 2>&1 &
runner=$!
for _ in $(seq 180); do
    grep -q "iterations on cpu" "$WORK/preempt.log" && break
    kill -0 "$runner" 2>/dev/null || break
    sleep 1
done
grep -q "iterations on cpu" "$WORK/preempt.log" || { tail -20 "$WORK/preempt.log" >&2; fail "the training to preempt did not start"; }
sleep 3
kill -TERM "$runner"
status=0
wait "$runner" || status=$?
grep -E 'SIGTERM|stopped' "$WORK/preempt.log" | sed 's/^/  /'
[ "$status" = 143 ] || { tail -20 "$WORK/preempt.log" >&2; fail "exit status $status after SIGTERM, expected 143 (128 + SIGTERM)"; }
[ -s "$WORK/results/smoke/preempt/checkpoints/semseg/last.pt" ] || fail "no checkpoint written on SIGTERM"

# ----------------------------------------------------------------------------- 8. checks
stage checks "the results on the host"
store=$WORK/$STORE
[ -f "$store/store.yaml" ] || fail "no store.yaml in $store"
"$PYTHON" -c "
import sys, yaml
tasks = [t['name'] for t in yaml.safe_load(open(sys.argv[1]))['tasks']]
sys.exit(0 if tasks == ['semseg'] else f'store.yaml lists {tasks}, expected [semseg]')" "$store/store.yaml" \
    || fail "store.yaml does not list the task"
"$RCM_NDDR" store verify "$store" >"$WORK/verify.log" 2>&1 || { cat "$WORK/verify.log" >&2; fail "store verify on the host failed"; }
say "store verify: $(tail -1 "$WORK/verify.log")"
[ -s "$store/runs/semseg/test_metrics.json" ] || fail "no test metrics JSON at $store/runs/semseg/test_metrics.json"
[ -s "$WORK/RI/smoke_ri.safetensors" ] || fail "the RI decomposition was not written to the RI mount"
uid=${RUN_AS%%:*}
gid=${RUN_AS#*:}
foreign=$(find "$WORK/results" "$WORK/RI" \( ! -uid "$uid" -o ! -gid "$gid" \) -printf '%u:%g %p\n' | head -5)
[ -z "$foreign" ] || fail "result files not owned by $RUN_AS: $foreign"
say "$(find "$WORK/results" "$WORK/RI" -type f | wc -l) result files, all owned by $RUN_AS"
"$PYTHON" -c "
import json, sys
env = json.load(open(sys.argv[1]))
image_id, commit = sys.argv[2], sys.argv[3]
problems = []
if env['container']['image_id'] != image_id:
    problems.append(f\"env.json records image id {env['container']['image_id']}, expected {image_id}\")
if env['git']['commit'] != commit:
    problems.append(f\"env.json records commit {env['git']['commit']}, expected {commit}\")
sys.exit('; '.join(problems) or None)" "$store/runs/semseg/env.json" "$IMAGE_ID" "$COMMIT" \
    || fail "the run's provenance does not name the image and the commit"
say "env.json records image $IMAGE_ID and commit $COMMIT"
# The default user mapping: without --user the container runs as the caller (root here when root).
"$RCM_NDDR" docker run --image "$IMAGE" --name "$CONTAINER_PREFIX-owner" --network none \
    --data "$WORK/data" --results "$WORK/owner" -- python -c "open('results/owner', 'w').write('x')" \
    >"$WORK/owner.log" 2>&1 || { cat "$WORK/owner.log" >&2; fail "the default-user container failed"; }
owner=$(stat -c '%u:%g' "$WORK/owner/owner")
[ "$owner" = "$(id -u):$(id -g)" ] || fail "a file written without --user belongs to $owner, not $(id -u):$(id -g)"
say "without --user, files belong to the caller ($owner)"

if [ "$E2E" = 1 ]; then
    stage e2e "the test suite's end-to-end Docker test in $IMAGE"
    RCM_NDDR_TEST_IMAGE=$IMAGE "$PYTHON" -m pytest -q -p no:cacheprovider -m docker -rs tests/test_docker.py \
        >"$WORK/e2e.log" 2>&1 || { tail -40 "$WORK/e2e.log" >&2; fail "the end-to-end test failed (log above)"; }
    grep -qE '[0-9]+ passed' "$WORK/e2e.log" && ! grep -qE '[0-9]+ skipped' "$WORK/e2e.log" \
        || { tail -20 "$WORK/e2e.log" >&2; fail "the end-to-end test did not run (log above)"; }
    say "e2e: $(tail -1 "$WORK/e2e.log")"
fi

stage finish "cleaning up"
if [ "$CLEAN" = 1 ]; then
    docker rmi "$IMAGE" "$BASE_IMAGE" >/dev/null && say "removed $IMAGE and $BASE_IMAGE"
fi
now=$(date +%s)
say "timings:"
printf '  %s\n' "${TIMINGS[@]}"
say "total $((now - T_START)) s: OK"
