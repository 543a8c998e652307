#!/usr/bin/env bash
# Hostile shapes that must stay cheap (issue 12): a context 10,000 levels
# deep, and a COPY / WORKDIR destination of 64,000 components. Prints
# seconds and peak RSS for kiln (release build) against the issue's bounds
# (64,000 components: under 2 s and 100 MiB), and, where a Docker engine
# answers, `docker build` of the same destination as the peer.
#
#   bash benches/hostile.sh [--kiln PATH] [--no-docker]
#
# Needs GNU time (/usr/bin/time) and python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
kiln="$repo/target/release/kiln" docker=1
while [ $# -gt 0 ]; do
  case "$1" in
    --kiln) kiln=$2; shift ;;
    --no-docker) docker=0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$kiln" ] || (cd "$repo" && cargo build --release --quiet)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export XDG_CACHE_HOME="$work/cache"

measure() { # label, command...
  local label=$1; shift
  if ! /usr/bin/time -o "$work/time" -f '%e %M' "$@" >/dev/null 2>"$work/err"; then
    echo "$label: failed: $(tail -1 "$work/err" | cut -c1-200)"
    return
  fi
  awk -v l="$label" '{ printf "%-58s %7.2f s %8.1f MiB\n", l, $1, $2 / 1024 }' "$work/time"
}

python3 - "$work" <<'EOF'
import os, sys
w = sys.argv[1]
# 64,000 components
os.makedirs(f"{w}/long", exist_ok=True)
n = 64000
with open(f"{w}/long/Dockerfile", "w") as f:
    f.write("FROM scratch\nWORKDIR /" + "/".join(["w"] * n) + "\nCOPY f /" + "/".join(["a"] * n) + "/f\n")
open(f"{w}/long/f", "w").write("x")
# 10,000 levels, built relative to each directory (deeper than PATH_MAX)
os.makedirs(f"{w}/deep", exist_ok=True)
open(f"{w}/deep/Dockerfile", "w").write("FROM scratch\nCOPY . /ctx/\n")
fd = os.open(f"{w}/deep", os.O_RDONLY)
for _ in range(10000):
    os.mkdir("d", dir_fd=fd)
    nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = nfd
leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
os.write(leaf, b"deep")
os.close(leaf)
os.close(fd)
EOF

echo "kiln: $("$kiln" --version 2>/dev/null || echo "$kiln")"
measure "kiln build: 64,000-component WORKDIR and COPY destination" \
  "$kiln" build "$work/long" --no-index -o "$work/long.tar"
measure "kiln hash (kiln-v1): 10,000-level tree" "$kiln" hash "$work/deep"
measure "kiln hash (taskgraph): 10,000-level tree" "$kiln" hash --algorithm taskgraph "$work/deep"
measure "kiln build: 10,000-level tree" "$kiln" build "$work/deep" --no-index -o "$work/deep.tar"
echo "bounds (issue 12): 64,000 components under 2 s and 100 MiB"

if [ "$docker" = 1 ] && docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  measure "docker build (peer): 64,000-component destination" \
    env DOCKER_BUILDKIT=0 docker build -q -t kiln-bench-long "$work/long"
  docker rmi -f kiln-bench-long >/dev/null 2>&1 || true
fi
