#!/usr/bin/env bash
# Time from `kiln build` starting to the first RUN's command starting, on
# the Debian test image (setup.sh's debootstrap minbase), cold (kiln's
# layer cache empty: the base is unpacked first) and warm (the base already
# unpacked once, as a CI machine has it after its first build).
#
# The RUN prints the clock (`date +%s.%N`) and kiln shows a step's output
# with --progress plain; the difference to the clock read just before kiln
# starts is the start time. Appends "run-start<TAB>cold|warm<TAB>seconds<TAB>0"
# lines to the TSV file given (compare.sh's results), and prints them.
#
#   bash benches/run_start.sh RESULTS.tsv [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
results=$1 runs=${2:-5}
kiln="$repo/target/release/kiln"
deb="$repo/.tools/debian-bookworm-minbase.tar"
if [ ! -s "$deb" ]; then
  echo "run_start: $deb is missing (bash setup.sh as root makes it); no RUN start time measured" >&2
  exit 0
fi
work=$(mktemp -d /tmp/kiln-run-start.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/deb" "$work/img"
ln -f "$deb" "$work/deb/rootfs.tar" 2>/dev/null || cp "$deb" "$work/deb/rootfs.tar"
printf 'FROM scratch\nADD rootfs.tar /\n' > "$work/deb/Dockerfile"
"$kiln" build "$work/deb" --no-index -t kiln-bench/debian:12 -o "$work/deb.tar" >/dev/null 2>&1
"$kiln" store add "$work/deb.tar" --store "$work/store" >/dev/null
printf 'FROM kiln-bench/debian:12\nRUN echo "kiln-run-started $(date +%%s.%%N)"\n' > "$work/img/Dockerfile"

one() { # cache-dir -> seconds from start to the RUN's first command
  local t0 t1
  t0=$(date +%s.%N)
  t1=$(XDG_CACHE_HOME="$1" "$kiln" build "$work/img" --store "$work/store" --no-index \
    --progress plain -o "$work/out.tar" 2>&1 | awk '/kiln-run-started/ && !/echo/ {print $NF; exit}')
  [ -n "$t1" ] || { echo "run_start: the RUN's output was not seen" >&2; exit 1; }
  echo "$t1 - $t0" | bc | awk '{printf "%.3f\n", $1}'
}
for i in $(seq "$runs"); do
  s=$(one "$work/cold-$i")
  printf 'run-start\tcold\t%s\t0\n' "$s" | tee -a "$results"
done
one "$work/warm" >/dev/null
for i in $(seq "$runs"); do
  s=$(one "$work/warm")
  printf 'run-start\twarm\t%s\t0\n' "$s" | tee -a "$results"
done
