#!/usr/bin/env bash
# Runs the docker compose deployment for real on a CPU host, with no image registry:
#  1. installs Debian's docker.io, docker-compose and debootstrap if missing (as root);
#  2. starts a private dockerd (own socket and data root, --bridge=none --iptables=false:
#     every container uses the host's network and talks on 127.0.0.1 only);
#  3. imports a Debian base image made by debootstrap, builds the project image from a
#     local wheelhouse with the network off, builds the demo model and adapters with it;
#  4. `docker-compose up -d` (CPU: the base file alone: two replicas, each a scheduler and
#     a worker, behind one frontend), waits for health, runs tests/compose (generation with
#     two adapters, LoadAdapter of a third, streaming, one replica's worker killed under
#     traffic and its recovery), then `docker-compose down` and stops dockerd.
# Containers, dockerd and temporary files are removed on exit (trap). Cached between runs
# in $LORASERVE_CI_CACHE (default /var/cache/loraserve-ci), each rebuilt when absent: the
# debootstrap tarball, the wheelhouse, and dockerd's data root (so the image's dependency
# layer is reused; a data root that dockerd cannot start on is discarded).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=${LORASERVE_CI_CACHE:-/var/cache/loraserve-ci}
WORK=$(mktemp -d /tmp/loraserve-compose.XXXXXX)
DOCKER=/usr/bin/docker  # Debian's client, the daemon's version (another may come first on PATH)
PROJECT=loraserve-ci
BASE_IMAGE=loraserve-base:ci
IMAGE=loraserve:ci
DEPENDENCIES_IMAGE=loraserve-dependencies:ci
PYTHON_FOR_TESTS=${PYTHON_FOR_TESTS:-$REPO/.venv/bin/python}
export DOCKER_HOST=unix://$WORK/docker.sock
DOCKERD_PID=

log() { echo "[compose-test $(date -u +%T) +${SECONDS}s] $*"; }
compose() { docker-compose -p "$PROJECT" -f "$REPO/docker-compose.yml" "$@"; }

cleanup() {
    local rc=$?
    trap - EXIT
    if [[ -n $DOCKERD_PID ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if [[ $rc -ne 0 ]]; then
            compose ps || true
            compose logs --no-color --tail 100 || true
        fi
        compose down --volumes --remove-orphans --timeout 20 || true
        $DOCKER rm --force $($DOCKER ps --all --quiet) >/dev/null 2>&1 || true
        $DOCKER image prune --force >/dev/null 2>&1 || true  # the previous runs' project layers
        kill "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
    fi
    # dockerd's mounts under the private data root go before the folder does.
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$WORK" "$REPO"/docker/wheelhouse/*.whl
    log "done (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT

install_packages() {
    if command -v dockerd >/dev/null && [[ -x $DOCKER ]] && command -v docker-compose >/dev/null \
            && command -v debootstrap >/dev/null; then
        return
    fi
    log "installing docker.io, docker-compose, debootstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        docker.io docker-compose debootstrap >/dev/null
}

start_dockerd() {
    if ! try_dockerd; then
        log "dockerd did not start on the cached data root: starting afresh"
        rm -rf "$CACHE/docker"
        try_dockerd || { cat "$WORK/dockerd.log"; echo "dockerd did not start" >&2; return 1; }
    fi
}

try_dockerd() {
    log "starting dockerd"
    dockerd --host "$DOCKER_HOST" --data-root "$CACHE/docker" --exec-root "$WORK/exec" \
        --pidfile "$WORK/dockerd.pid" --bridge=none --iptables=false --ip6tables=false \
        --ip-forward=false --ip-masq=false --userland-proxy=false >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        $DOCKER info >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" || true
    DOCKERD_PID=
    return 1
}

debian_mirror() {
    local url
    url=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | head -n1 | tr -d ' ')
    echo "${url:-http://deb.debian.org/debian}"
}

build_base_image() {
    local suite tarball
    suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
    tarball=$CACHE/debian-$suite-python3.tar
    if $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        return
    fi
    if [[ ! -s $tarball ]]; then
        log "debootstrap $suite (not cached)"
        debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$WORK/rootfs" \
            "$(debian_mirror)" >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log"; return 1; }
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        mkdir -p "$CACHE"
        tar -C "$WORK/rootfs" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
        rm -rf "$WORK/rootfs"
    fi
    log "importing the base image"
    $DOCKER import "$tarball" "$BASE_IMAGE" >/dev/null
}

fill_wheelhouse() {
    local key wheelhouse
    key=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
    wheelhouse=$CACHE/wheelhouse-$key
    if [[ ! -f $wheelhouse/complete ]]; then
        log "downloading the wheelhouse (not cached)"
        rm -rf "$wheelhouse" && mkdir -p "$wheelhouse"
        # The project's runtime dependencies at the locked versions, as cp311 wheels (the
        # base image's Python), plus setuptools to build the project inside the image.
        python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
            >"$WORK/runtime-requirements.txt"
        python3 -m pip download --quiet --only-binary=:all: --python-version 3.11 --dest "$wheelhouse" \
            --constraint requirements.lock --requirement "$WORK/runtime-requirements.txt" "setuptools>=68" \
            2>"$WORK/pip.log" || { cat "$WORK/pip.log"; return 1; }
        touch "$wheelhouse/complete"
    fi
    cp --link "$wheelhouse"/*.whl docker/wheelhouse/ 2>/dev/null || cp "$wheelhouse"/*.whl docker/wheelhouse/
}

build_image() {
    # The dependency stage gets a tag of its own, so that pruning dangling images at the end
    # keeps it cached for the next run.
    local stage
    for stage in dependencies final; do
        log "building the image's $stage stage (network off)"
        DOCKER_BUILDKIT=0 $DOCKER build --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" \
            $([[ $stage == dependencies ]] && echo "--target dependencies --tag $DEPENDENCIES_IMAGE" \
                || echo "--tag $IMAGE") "$REPO" >"$WORK/build-$stage.log" 2>&1 \
            || { tail -n 50 "$WORK/build-$stage.log"; return 1; }
    done
}

build_demo() {
    log "building the demo model and adapters with the image"
    mkdir -p "$WORK/demo"
    $DOCKER run --rm --network none --user 0 -e LORASERVE_HOME=/out -v "$WORK/demo:/out" "$IMAGE" \
        python -c "from loraserve.demo import ensure_demo; ensure_demo()"
    chmod -R a+rX "$WORK/demo"
}

main() {
    [[ $(id -u) -eq 0 ]] || { echo "compose_test.sh runs dockerd: run it as root" >&2; exit 1; }
    install_packages
    mkdir -p "$CACHE"
    exec 9>"$CACHE/lock"
    flock 9  # one run at a time uses the cache and its dockerd data root
    start_dockerd
    build_base_image
    fill_wheelhouse
    build_image
    build_demo

    local demo=$WORK/demo/demo-v1
    export LORASERVE_IMAGE=$IMAGE LORASERVE_MODEL_DIR=$demo/model LORASERVE_ADAPTERS_DIR=$demo/adapters
    export LORASERVE_LORA_PATHS="demo-qv=/adapters/demo-qv demo-all=/adapters/demo-all"
    export LORASERVE_DEVICE=cpu LORASERVE_DTYPE=float32 LORASERVE_NUM_KV_PAGES=512
    export LORASERVE_HOST_CACHE_BYTES=$((64 << 20)) LORASERVE_MAX_LORA_RANK=16
    read -r LORASERVE_PORT LORASERVE_SCHEDULER_PORT LORASERVE_WORKER_PORT LORASERVE_SCHEDULER_PORT_2 \
        LORASERVE_WORKER_PORT_2 < <(free_ports 5)
    export LORASERVE_PORT LORASERVE_SCHEDULER_PORT LORASERVE_WORKER_PORT LORASERVE_SCHEDULER_PORT_2 \
        LORASERVE_WORKER_PORT_2 LORASERVE_MODEL_NAME=demo
    log "docker-compose up"
    compose up --detach --no-build
    wait_healthy frontend 300

    [[ -x $PYTHON_FOR_TESTS ]] || bash scripts/setup.sh
    log "running tests/compose"
    LORASERVE_COMPOSE_ADDRESS=127.0.0.1:$LORASERVE_PORT LORASERVE_COMPOSE_PROJECT=$PROJECT \
        LORASERVE_COMPOSE_DOCKER=$DOCKER \
        HF_HUB_OFFLINE=1 "$PYTHON_FOR_TESTS" -m pytest -q -s -p no:cacheprovider tests/compose
    log "docker-compose down"
    compose down --volumes --timeout 20
}

free_ports() {  # N distinct loopback ports that are free now (the machine may run other tests)
    python3 -c 'import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))' "$1"
}

wait_healthy() {
    local service=$1 timeout=$2 container status
    container=$(compose ps --quiet "$service")
    for _ in $(seq "$timeout"); do
        status=$($DOCKER inspect --format '{{.State.Health.Status}}' "$container")
        [[ $status == healthy ]] && { log "$service is healthy"; return; }
        sleep 1
    done
    echo "$service was not healthy within $timeout s (last: $status)" >&2
    return 1
}

main "$@"
