#!/usr/bin/env bash
# kiln's comparison runner: generates the seeded benchmark trees (never
# committed), warms the page cache, runs every contender several times and
# writes benches/RESULTS.md: medians, peak RSS and ratios, with each target
# (issues 3 and 16) marked met or missed. Besides the contenders it measures
# the floors (examples/read_floor.rs: open+fstat+read+close of every file,
# with and without sha256, batched through io_uring, and stat only), kiln-v1's
# time and peak RSS at 1x, 2x and 4x the many-small tree, the default
# (indexed) build against --no-index, and the time to the first RUN
# (benches/run_start.sh).
#
#   bash benches/compare.sh [--runs N] [--slow-runs N] [--no-scale-check] [--work DIR]
#                           [--trees many-small,large] [--append] [--no-buildah] [--no-docker]
#                           [--slow-timeout SECONDS]
#
# Needs: python3, the taskgraph venv (bash setup.sh), buildah (apt), zstd,
# GNU time. The Docker contender runs only where an engine answers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
runs=3 slow_runs=1 scale_check=1 work=${TMPDIR:-/tmp}/kiln-bench buildah=1 docker=1
trees="many-small large" append=0 slow_timeout=900
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift ;;
    --slow-runs) slow_runs=$2; shift ;;
    --scale-check) scale_check=1 ;;
    --no-scale-check) scale_check=0 ;;
    --work) work=$2; shift ;;
    --no-buildah) buildah=0 ;;
    --no-docker) docker=0 ;;
    --trees) trees=${2//,/ }; shift ;;
    --append) append=1 ;;
    --slow-timeout) slow_timeout=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
command -v buildah >/dev/null || { [ $buildah = 0 ] || { echo "compare: installing buildah"; apt-get install -y -qq buildah >/dev/null; }; }
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null
py="$repo/.tools/taskgraph-venv/bin/python"
[ -x "$py" ] || bash "$repo/setup.sh"
(cd "$repo" && cargo build --release --quiet && cargo build --release --quiet --example sha256_limit --example read_floor)
kiln="$repo/target/release/kiln"
mkdir -p "$work"
results="$work/results.tsv"
[ $append = 1 ] || : > "$results"

tree() { # kind scale -> dir
  local d="$work/$1-x$2"
  if [ ! -f "$d/.done" ]; then
    echo "compare: generating $1 x$2 in $d" >&2
    rm -rf "$d"
    python3 "$here/gen_tree.py" "$d" --kind "$1" --scale "$2"
    printf 'FROM scratch\nCOPY tree /tree\n' > "$d/Dockerfile.plain"
    touch "$d/.done"
  fi
  du -sb --apparent-size "$d/tree" | cut -f1 > "$work/$1-x$2.tree-bytes"
  echo "$d"
}

warm() { find "$1/tree" -type f -print0 | xargs -0 cat > /dev/null; }

# measure TREE CONTENDER RUNS COMMAND... : appends "tree contender seconds rss_kb" per run
measure() {
  local t=$1 name=$2 n=$3; shift 3
  for _ in $(seq "$n"); do
    local rc=0
    /usr/bin/time -o "$work/time.txt" -f "%e %M" "$@" > /dev/null 2> "$work/err.txt" || rc=$?
    if [ $rc = 124 ]; then
      printf '%s\t%s\t%s\t%s\n' "$t" "$name" "timeout" "0" >> "$results"
      echo "compare: $t $name timed out" >&2; return 0
    elif [ $rc != 0 ]; then
      echo "compare: $name failed:" >&2; cat "$work/err.txt" >&2; return 0
    fi
    read -r secs rss < "$work/time.txt"
    printf '%s\t%s\t%s\t%s\n' "$t" "$name" "$secs" "$rss" >> "$results"
    echo "compare: $t $name ${secs}s ${rss}KB" >&2
  done
}

limit=$("$repo/target/release/examples/sha256_limit")
for kind in $trees; do
  d=$(tree "$kind" 1)
  img="$d/taskcluster/docker/$kind"
  warm "$d"
  cd "$d"
  floor="$repo/target/release/examples/read_floor"
  measure "$kind" "floor: open+fstat+read+close" "$runs" "$floor" "$d/tree"
  measure "$kind" "floor: open+fstat+read+sha256+close" "$runs" "$floor" --sha256 "$d/tree"
  measure "$kind" "floor: the same batched (io_uring)" "$runs" "$floor" --uring-fstat --sha256 "$d/tree"
  measure "$kind" "floor: stat only" "$runs" "$floor" --stat "$d/tree"
  measure "$kind" "kiln hash kiln-v1" "$runs" "$kiln" hash --topsrcdir "$d" "$img"
  measure "$kind" "kiln hash kiln-v1, one call per operation (KILN_NO_URING=1)" "$runs" env KILN_NO_URING=1 "$kiln" hash --topsrcdir "$d" "$img"
  measure "$kind" "kiln hash taskgraph" "$runs" "$kiln" hash --algorithm taskgraph --topsrcdir "$d" "$img"
  rm -f "$work/hash-cache"
  "$kiln" hash --topsrcdir "$d" "$img" --hash-cache "$work/hash-cache" > /dev/null
  sleep 3
  "$kiln" hash --topsrcdir "$d" "$img" --hash-cache "$work/hash-cache" > /dev/null
  measure "$kind" "kiln hash kiln-v1 --hash-cache (unchanged)" "$runs" "$kiln" hash --topsrcdir "$d" "$img" --hash-cache "$work/hash-cache"
  # The default build (indexed: each layer written into a fresh user store and
  # the output at once) and --no-index, alternately: each pays for the
  # writeback the one before it left, so neither always comes after the other.
  for _ in $(seq "$runs"); do
    measure "$kind" "kiln build (docker-archive, zstd -3 layers)" 1 "$kiln" build --no-index --topsrcdir "$d" "$img" --layer-compression zstd --compression-level 3 -o "$work/out.tar"
    measure "$kind" "kiln build, indexed (the default)" 1 sh -c "c=\$(mktemp -d -p '$work' xdg.XXXXXX) && XDG_CACHE_HOME=\$c '$kiln' build --topsrcdir '$d' '$img' --layer-compression zstd --compression-level 3 -o '$work/out-indexed.tar'"
  done
  rm -rf "$work"/xdg.*
  measure "$kind" "taskgraph generate_context_hash" "$runs" "$py" -c "from taskgraph.util.docker import generate_context_hash as g; print(g('$d', 'taskcluster/docker/$kind', {}))"
  measure "$kind" "find | sort | xargs sha256sum | sha256sum" "$runs" sh -c 'find tree -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum'
  measure "$kind" "tar cf - | zstd -T0 -3 (floor)" "$runs" sh -c "tar cf - tree | zstd -T0 -3 -q > '$work/floor.tar.zst'"
  if [ $buildah = 1 ]; then
    measure "$kind" "buildah build (vfs, chroot, --timestamp 0)" "$slow_runs" timeout "$slow_timeout" sh -c "buildah --root '$work/buildah' --runroot '$work/buildah-run' --storage-driver vfs build --isolation chroot --timestamp 0 -q -f Dockerfile.plain -t bench . && buildah --root '$work/buildah' --runroot '$work/buildah-run' --storage-driver vfs rmi -a -f"
  fi
  if [ $docker = 1 ] && docker version --format '{{.Server.Version}}' > /dev/null 2>&1; then
    measure "$kind" "docker build + docker save" "$slow_runs" timeout "$slow_timeout" sh -c "DOCKER_BUILDKIT=0 docker build -q -f Dockerfile.plain -t kiln-bench:$kind . && docker save -o '$work/docker.tar' kiln-bench:$kind && docker rmi -f kiln-bench:$kind"
  fi
  rm -f "$work/out.tar" "$work/out-indexed.tar" "$work/floor.tar.zst" "$work/docker.tar"
  cd "$repo"
done

bash "$here/run_start.sh" "$results" "$runs" >&2

if [ $scale_check = 1 ]; then
  for s in 1 2 4; do
    d=$(tree many-small "$s")
    warm "$d"
    measure "scale-x$s" "kiln hash kiln-v1" "$runs" "$kiln" hash --topsrcdir "$d" "$d/taskcluster/docker/many-small"
    cp "$work/many-small-x$s.tree-bytes" "$work/scale-x$s.bytes"
  done
fi

python3 "$here/report.py" "$results" "$limit" "$work" > "$here/RESULTS.md"
echo "compare: wrote benches/RESULTS.md" >&2
