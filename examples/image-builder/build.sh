#!/usr/bin/env bash
# Builds the image_builder image with kiln, from scratch:
#   examples/image-builder/build.sh [OUTPUT] [-- more kiln build flags]
# OUTPUT defaults to image-builder.tar (a docker-archive: `docker load -i`).
# $KILN names the kiln binary to package (default: a release build of this
# checkout, made with cargo). Two builds of the same binary are identical.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-image-builder.tar}
shift || true
[ "${1:-}" = "--" ] && shift
if [ -z "${KILN:-}" ]; then
  cargo build --release --locked --manifest-path "$repo/Cargo.toml" >&2
  KILN=$repo/target/release/kiln
fi
certs=/etc/ssl/certs/ca-certificates.crt
[ -s "$certs" ] || { echo "build.sh: $certs is missing: install Debian's ca-certificates" >&2; exit 1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/image-builder/rootfs/kiln/bin" "$ctx/image-builder/rootfs/kiln/cache" \
  "$ctx/image-builder/rootfs/etc/ssl/certs" "$ctx/image-builder/rootfs/tmp" "$ctx/image-builder/rootfs/workspace"
cp "$here/Dockerfile" "$ctx/image-builder/"
# Without debug information (strip's output depends only on its input).
if command -v strip >/dev/null; then
  strip --strip-debug -o "$ctx/image-builder/rootfs/kiln/bin/kiln" "$KILN"
else
  cp "$KILN" "$ctx/image-builder/rootfs/kiln/bin/kiln"
fi
cp "$certs" "$ctx/image-builder/rootfs/etc/ssl/certs/ca-certificates.crt"
# The shared libraries the binary links (none for a static build).
ldd "$KILN" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
  mkdir -p "$ctx/image-builder/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/image-builder/rootfs$lib"
done
version=$("$KILN" --version | awk '{print $2}')
"$KILN" build "$ctx/image-builder" --topsrcdir "$ctx" --no-index \
  -t "kiln-image-builder:$version" -o "$out" "$@"
