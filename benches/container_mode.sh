#!/usr/bin/env bash
# RUN where kaniko runs, measured in one run (issue 22):
#   1. the Taskcluster-style Debian image (useradd, apt-get install, ADD of a
#      `# %include`) on setup.sh's debootstrapped base, built
#        - by kiln on the host (its namespace sandbox),
#        - by kiln inside `docker run` with Docker's defaults (container mode),
#        - by buildah (chroot isolation, vfs), for comparison;
#   2. the image_builder image (examples/image-builder, release binary): its
#      size, and the time from `docker run` to the finished image.tar.zst
#      for a parent (the Debian image) and a child (FROM $DOCKER_IMAGE_PARENT).
# Each build has a warm apt mirror behind it only as far as the network is
# warm: apt-get downloads from Debian's archive every time.
#
#   bash benches/container_mode.sh [RESULTS.tsv]
# Prints "what<TAB>seconds" lines (and appends them to RESULTS.tsv if given).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
results=${1:-/dev/null}
kiln="$repo/target/release/kiln"
deb="$repo/.tools/debian-bookworm-minbase.tar"
py="$repo/.tools/taskgraph-venv/bin/python"
[ -x "$kiln" ] || cargo build --release --locked --manifest-path "$repo/Cargo.toml" >&2
[ -s "$deb" ] || { echo "container_mode: $deb is missing: run bash setup.sh as root" >&2; exit 1; }
command -v docker >/dev/null || { echo "container_mode: no docker" >&2; exit 1; }
work=$(mktemp -d /tmp/kiln-container-bench.XXXXXX)
trap 'rm -rf "$work"; docker rmi -f kiln-bench/image-builder:1 >/dev/null 2>&1 || true' EXIT
say() { printf '%s\t%s\n' "$1" "$2" | tee -a "$results"; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
now() { date +%s.%N; }

# The base, in a store; the tree.
mkdir -p "$work/base" "$work/tree/taskcluster/docker/tcimage" "$work/tree/taskcluster/docker/child" "$work/tree/kiln-test"
ln -f "$deb" "$work/base/rootfs.tar" 2>/dev/null || cp "$deb" "$work/base/rootfs.tar"
printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' > "$work/base/Dockerfile"
"$kiln" build "$work/base" --no-index --layer-compression gzip -t debian:bookworm-minbase -o "$work/base.tar" >/dev/null 2>&1
"$kiln" store add "$work/base.tar" --store "$work/store" >/dev/null
echo "hello from topsrcdir" > "$work/tree/kiln-test/hello.txt"
cat > "$work/tree/taskcluster/docker/tcimage/Dockerfile" <<'EOF'
FROM debian:bookworm-minbase
# %include kiln-test/hello.txt
RUN groupadd -g 1000 worker && useradd -u 1000 -g 1000 -d /builds/worker -s /bin/bash -m worker
WORKDIR /builds/worker
RUN apt-get update && apt-get install -y --no-install-recommends git python3-requests && rm -rf /var/lib/apt/lists/*
ADD topsrcdir/kiln-test/hello.txt /builds/worker/hello.txt
USER worker
EOF
printf 'FROM $DOCKER_IMAGE_PARENT\nUSER root\nRUN echo child > /child-note\n' > "$work/tree/taskcluster/docker/child/Dockerfile"
sed 's|^# %include.*||; s|topsrcdir/||' "$work/tree/taskcluster/docker/tcimage/Dockerfile" > "$work/tree/Dockerfile.plain"

# 1a. kiln, namespace sandbox, on the host (warm layer cache: one build first).
host() {
  XDG_CACHE_HOME="$work/cache" "$kiln" build "$work/tree/taskcluster/docker/tcimage" --topsrcdir "$work/tree" \
    --store "$work/store" --no-index -o "$work/host.tar" >/dev/null 2>&1
}
host
t0=$(now); host; say "debian-image kiln sandbox (host, warm)" "$(secs "$t0" "$(now)")"

# 1b. kiln inside docker run with Docker's defaults (container mode), from
# the image_builder image (examples/image-builder, this release binary).
KILN="$kiln" bash "$repo/examples/image-builder/build.sh" "$work/ib.tar" >/dev/null 2>&1
docker load -i "$work/ib.tar" | sed -n 's/^Loaded image: //p' > "$work/ib.name"
docker tag "$(cat "$work/ib.name")" kiln-bench/image-builder:1
t0=$(now)
docker run --rm --entrypoint /kiln/bin/kiln -e XDG_CACHE_HOME=/w/ccache -v "$work:/w" kiln-bench/image-builder:1 build \
  /w/tree/taskcluster/docker/tcimage --topsrcdir /w/tree --store /w/store --no-index -o /w/out/cont.tar >/dev/null 2>&1
say "debian-image kiln container mode (docker run, cold cache)" "$(secs "$t0" "$(now)")"

# 1c. buildah.
if command -v buildah >/dev/null; then
  buildah --root "$work/buildah" --runroot "$work/buildah-run" --storage-driver vfs pull -q "docker-archive:$work/base.tar" >/dev/null
  buildah --root "$work/buildah" --runroot "$work/buildah-run" --storage-driver vfs tag "$(buildah --root "$work/buildah" --runroot "$work/buildah-run" --storage-driver vfs images -q | head -1)" debian:bookworm-minbase
  cp "$work/tree/kiln-test/hello.txt" "$work/tree/hello.txt"
  sed -i 's|ADD kiln-test/hello.txt|ADD hello.txt|' "$work/tree/Dockerfile.plain"
  t0=$(now)
  (cd "$work/tree" && buildah --root "$work/buildah" --runroot "$work/buildah-run" --storage-driver vfs build \
    --isolation chroot --timestamp 0 -q -f Dockerfile.plain -t bench . >/dev/null 2>&1)
  say "debian-image buildah (vfs, chroot)" "$(secs "$t0" "$(now)")"
fi

# 2. The image_builder image: size, and docker run to image.tar.zst.
say "image-builder archive bytes" "$(stat -c %s "$work/ib.tar")"
say "image-builder image size (docker)" "$(docker image inspect -f '{{.Size}}' kiln-bench/image-builder:1)"
mkdir -p "$work/ws-parent" "$work/ws-child"
"$py" -c "from taskgraph.util.docker import create_context_tar as c; print(c('$work/tree', 'taskcluster/docker/tcimage', '$work/ws-parent/context.tar.gz', None))" > "$work/parent.hash"
"$py" -c "from taskgraph.util.docker import create_context_tar as c; print(c('$work/tree', 'taskcluster/docker/child', '$work/ws-child/context.tar.gz', None))" > "$work/child.hash"
cp -r "$work/store" "$work/ws-parent/store"
t0=$(now)
docker run --rm --network host -v "$work/ws-parent:/workspace" -e IMAGE_NAME=tcimage -e HASH="$(cat "$work/parent.hash")" \
  -e DOCKER_IMAGE_ZSTD_LEVEL=10 kiln-bench/image-builder:1 -- --store /workspace/store >/dev/null 2>&1
say "image-builder parent (docker run to image.tar.zst)" "$(secs "$t0" "$(now)")"
zstd -dq "$work/ws-parent/out/image.tar.zst" -o "$work/ws-child/parent.tar"
t0=$(now)
docker run --rm --network host -v "$work/ws-child:/workspace" -e IMAGE_NAME=child -e HASH="$(cat "$work/child.hash")" \
  -e DOCKER_IMAGE_ZSTD_LEVEL=10 -e PARENT_TASK_ID=local kiln-bench/image-builder:1 >/dev/null 2>&1
say "image-builder child (docker run to image.tar.zst)" "$(secs "$t0" "$(now)")"
say "image-builder parent image.tar.zst bytes" "$(stat -c %s "$work/ws-parent/out/image.tar.zst")"
