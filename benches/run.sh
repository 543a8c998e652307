#!/usr/bin/env bash
# RUN against its peers (issue 13), in one run on this machine:
#   1. the overhead of one `RUN true` on a busybox base: a build with it
#      minus the same build with `ENV X=1` instead, for kiln, buildah
#      (vfs, chroot isolation) and `docker build`;
#   2. a Taskcluster-style Debian image (useradd, apt-get install git
#      python3-requests, an ADD from # %include) built by each;
#   3. kiln's peak RSS (GNU time's maximum resident set).
# Prints a Markdown table; with --append adds it to benches/RESULTS.md.
#
#   bash benches/run.sh [--runs N] [--append] [--no-buildah] [--no-docker]
#
# Needs: bash setup.sh (as root: busybox-static, the debootstrap base),
# buildah, a Docker engine, GNU time. Run as root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
runs=5 append=0 buildah=1 docker=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift ;;
    --append) append=1 ;;
    --no-buildah) buildah=0 ;;
    --no-docker) docker=0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
command -v buildah >/dev/null || buildah=0
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || docker=0
kiln="$repo/target/release/kiln"
(cd "$repo" && cargo build --release --quiet)
work=$(mktemp -d /tmp/kiln-run-bench.XXXXXX)
trap 'rm -rf "$work"; buildah --storage-driver vfs rmi -af >/dev/null 2>&1 || true' EXIT
export XDG_CACHE_HOME="$work/cache"
B="buildah --storage-driver vfs"

# The busybox base, as an OCI archive (gzip layers, for every peer).
mkdir -p "$work/bb/rootfs/bin" "$work/bb/rootfs/etc" "$work/bb/rootfs/tmp"
cp "$(command -v busybox)" "$work/bb/rootfs/bin/busybox"
for a in $(busybox --list); do [ "$a" = busybox ] || ln -s busybox "$work/bb/rootfs/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$work/bb/rootfs/etc/passwd"
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$work/bb/rootfs" -cf "$work/bb/rootfs.tar" .
printf 'FROM scratch\nADD rootfs.tar /\n' > "$work/bb/Dockerfile"
"$kiln" build "$work/bb" --no-index --layer-compression gzip -t kiln-bench/busybox:1 -o "$work/bb.tar" >/dev/null
"$kiln" store add "$work/bb.tar" --store "$work/store" >/dev/null
mkdir -p "$work/true" "$work/env"
printf 'FROM kiln-bench/busybox:1\nRUN true\n' > "$work/true/Dockerfile"
printf 'FROM kiln-bench/busybox:1\nENV X=1\n' > "$work/env/Dockerfile"
if [ "$buildah" = 1 ]; then id=$($B pull -q "docker-archive:$work/bb.tar") && $B tag "$id" kiln-bench/busybox:1; fi
if [ "$docker" = 1 ]; then docker load -q -i "$work/bb.tar" >/dev/null; fi

# median seconds of N runs of a command
median() {
  local n=$1; shift
  local ts=()
  for _ in $(seq "$n"); do
    local s e
    s=$(date +%s.%N); "$@" >/dev/null 2>"$work/err" || { echo "failed: $*" >&2; cat "$work/err" >&2; exit 1; }; e=$(date +%s.%N)
    ts+=("$(echo "$e - $s" | bc)")
  done
  printf '%s\n' "${ts[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.3f\n", a[int((NR+1)/2)]}'
}
# a command that must succeed, timed once (a failure stops the bench)
once() {
  local s e
  s=$(date +%s.%N); "$@" >/dev/null 2>"$work/err" || { echo "failed: $*" >&2; cat "$work/err" >&2; exit 1; }
  e=$(date +%s.%N)
  echo "$e - $s" | bc | awk '{printf "%.3f\n", $1}'
}
kiln_build() { "$kiln" build "$work/$1" --store "$work/store" --no-index -o "$work/$1.tar"; }
buildah_build() { $B bud -q --isolation chroot --layers=false -t "kb-$1" "$work/$1"; }
docker_build() { DOCKER_BUILDKIT=0 docker build -q --no-cache -t "kb-$1" "$work/$1"; }

rows=()
line() { rows+=("| $1 | $2 | $3 | $4 |"); }
for tool in kiln buildah docker; do
  [ "$tool" = buildah ] && [ "$buildah" = 0 ] && continue
  [ "$tool" = docker ] && [ "$docker" = 0 ] && continue
  t_true=$(median "$runs" "${tool}_build" true)
  t_env=$(median "$runs" "${tool}_build" env)
  over=$(echo "($t_true - $t_env) * 1000" | bc)
  line "$tool: \`RUN true\` build" "$runs" "$t_true s" "overhead $(printf %.0f "$over") ms over the ENV-only build ($t_env s)"
done

# The Debian image.
deb="$repo/.tools/debian-bookworm-minbase.tar"
if [ -s "$deb" ]; then
  mkdir -p "$work/deb" "$work/tc/kiln-test" "$work/tc/taskcluster/docker/tcimage"
  ln -f "$deb" "$work/deb/rootfs.tar" 2>/dev/null || cp "$deb" "$work/deb/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\n' > "$work/deb/Dockerfile"
  "$kiln" build "$work/deb" --no-index --layer-compression gzip -t kiln-bench/debian:12 -o "$work/deb.tar" >/dev/null
  "$kiln" store add "$work/deb.tar" --store "$work/store" >/dev/null
  echo "hello" > "$work/tc/kiln-test/hello.txt"
  cat > "$work/tc/taskcluster/docker/tcimage/Dockerfile" <<'EOF'
FROM kiln-bench/debian:12
# %include kiln-test/hello.txt
RUN groupadd -g 1000 worker && useradd -u 1000 -g 1000 -d /builds/worker -s /bin/bash -m worker
WORKDIR /builds/worker
RUN apt-get update && apt-get install -y --no-install-recommends git python3-requests && rm -rf /var/lib/apt/lists/*
ADD topsrcdir/kiln-test/hello.txt /builds/worker/hello.txt
USER worker
EOF
  # The base unpacked once into kiln's layer cache, as the peers import it
  # into their storage before the timed build.
  mkdir -p "$work/warm" && printf 'FROM kiln-bench/debian:12\nRUN true\n' > "$work/warm/Dockerfile"
  "$kiln" build "$work/warm" --store "$work/store" --no-index -o "$work/warm.oci" >/dev/null 2>&1
  # An OCI layout (zstd layers): the peers commit to local storage, uncompressed.
  t=$(once "$kiln" build "$work/tc/taskcluster/docker/tcimage" --topsrcdir "$work/tc" --store "$work/store" --no-index -o "$work/tc.oci")
  # kiln's own peak RSS (VmHWM of the kiln process, not of apt in the sandbox).
  "$kiln" build "$work/tc/taskcluster/docker/tcimage" --topsrcdir "$work/tc" --store "$work/store" --no-index -o "$work/tc2.oci" >/dev/null 2>&1 &
  pid=$! hwm=0
  while kill -0 "$pid" 2>/dev/null; do
    v=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${v:-0}" -gt "$hwm" ] && hwm=$v
    sleep 0.05
  done
  wait "$pid"
  line "kiln: Debian image (useradd, apt-get install), OCI layout" 1 "$t s" "kiln's own peak RSS $((hwm / 1024)) MiB"
  # Peers build from the docker context kiln writes (topsrcdir/ included).
  "$kiln" context "$work/tc/taskcluster/docker/tcimage" --topsrcdir "$work/tc" -o "$work/ctx.tar.gz" >/dev/null
  mkdir -p "$work/peerctx" && tar -xzf "$work/ctx.tar.gz" -C "$work/peerctx"
  if [ "$buildah" = 1 ]; then
    id=$($B pull -q "docker-archive:$work/deb.tar")
    $B tag "$id" kiln-bench/debian:12
    t=$(once $B bud -q --isolation chroot --layers=false -t kb-deb "$work/peerctx")
    line "buildah (vfs, chroot): Debian image" 1 "$t s" ""
  fi
  if [ "$docker" = 1 ]; then
    docker load -q -i "$work/deb.tar" >/dev/null
    t=$(once env DOCKER_BUILDKIT=0 docker build -q --no-cache -t kb-deb "$work/peerctx")
    line "docker build: Debian image" 1 "$t s" ""
    docker rmi -f kb-deb kb-true kb-env kiln-bench/debian:12 kiln-bench/busybox:1 >/dev/null 2>&1 || true
  fi
fi

out=$(
  echo "## RUN ($(date +%F), $(nproc) cores, $(uname -r))"
  echo
  echo "| what | runs | median | notes |"
  echo "| --- | ---: | ---: | --- |"
  printf '%s\n' "${rows[@]}"
)
echo "$out"
if [ "$append" = 1 ]; then printf '\n%s\n' "$out" >> "$here/RESULTS.md"; fi
