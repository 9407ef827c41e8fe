#!/usr/bin/env bash
# Debian packages ember's tests and benchmarks use: bubblewrap (sandbox isolation), slirp4netns (sandboxes' outbound
# network, docs/decisions/0008), curl (a bootstrap runtime in the tests),
# spin (the protocol model), wrk (the load generator of `make bench`), chromium and its driver (the
# dashboard's browser test), etcd-server (the cluster's store: `etcd`, started by the cluster tests and
# `ember cluster up`), iproute2 (`ip`, with which the chaos harness cuts the network) and nodejs (`node`:
# the nodejs18.x/20.x/22.x runtimes run on the host's node; Debian's, 18 or later, serves all three).
# Installs what is missing when run as root; otherwise says what to install.
# `install-deps.sh run` (what `make run` calls): only what functions need (bubblewrap, slirp4netns, nodejs);
# not being root then is a note, not an error (ember falls back to unshare(1) or no isolation, and says so).
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v slirp4netns >/dev/null 2>&1 || need+=(slirp4netns)
command -v node >/dev/null 2>&1 || need+=(nodejs)  # the nodejs*.x runtimes run on the host's node
if [ "${1:-}" = "run" ]; then
  [ ${#need[@]} -eq 0 ] && exit 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: sandbox isolation wants ${need[*]} (install them with: sudo apt-get install ${need[*]})" >&2
    exit 0
  fi
fi
if [ "${1:-}" != "run" ]; then
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v spin >/dev/null 2>&1 || need+=(spin)
command -v wrk  >/dev/null 2>&1 || need+=(wrk)
command -v gcc  >/dev/null 2>&1 || need+=(gcc)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ip   >/dev/null 2>&1 || need+=(iproute2)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "missing system packages: ${need[*]} (install them with: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
