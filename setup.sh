#!/usr/bin/env bash
# Installs what kiln's tests use, when missing: the real OCI tools from
# Debian's packages and taskcluster-taskgraph (the oracle for the
# taskgraph-compatible hash) in a venv under .tools/. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

need=()
for tool in umoci:umoci skopeo:skopeo oci-image-tool:oci-image-tool podman:podman zstd:zstd cc:gcc \
  docker-registry:docker-registry htpasswd:apache2-utils newuidmap:uidmap curl:curl; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
# Debian's CA bundle, which the image_builder image packages.
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
# A static busybox for the base image the store interop test builds and runs.
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
# Static libc for the tiny test binary that `docker run` executes.
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/aarch64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# A Debian bookworm minbase root filesystem for the real-world RUN test
# (apt-get install inside kiln's sandbox), made once with debootstrap.
debian=.tools/debian-bookworm-minbase.tar
if [ ! -s "$debian" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    command -v debootstrap >/dev/null 2>&1 || {
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    echo "setup: making $debian with debootstrap (once)"
    rm -rf .tools/debian-rootfs
    mkdir -p .tools
    debootstrap --variant=minbase bookworm .tools/debian-rootfs http://deb.debian.org/debian >/dev/null
    rm -rf .tools/debian-rootfs/var/cache/apt/archives/*.deb .tools/debian-rootfs/var/lib/apt/lists/*
    tar --numeric-owner --sort=name -C .tools/debian-rootfs -cf "$debian.tmp" .
    mv "$debian.tmp" "$debian"
    rm -rf .tools/debian-rootfs
  else
    echo "setup: not root: skipping $debian (debootstrap needs root; the Debian RUN test needs it)"
  fi
fi

venv=.tools/taskgraph-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import taskgraph, zstandard' 2>/dev/null; then
  echo "setup: creating $venv with taskcluster-taskgraph"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'taskcluster-taskgraph[load-image]>=24,<25'
fi
echo "setup: ready (taskgraph $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("taskcluster-taskgraph"))'))"
