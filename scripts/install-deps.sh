#!/usr/bin/env bash
# Debian packages ember's tests and benchmarks use: bubblewrap (sandbox isolation), curl (a bootstrap runtime in the tests),
# spin (the protocol model), wrk (the load generator of `make bench`), chromium and its driver (the
# dashboard's browser test), etcd-server (the cluster's store: `etcd`, started by the cluster tests and
# `ember cluster up`), iproute2 (`ip`, with which the chaos harness cuts the network) and nodejs (`node`:
# the nodejs18.x/20.x/22.x runtimes run on the host's node; Debian's, 18 or later, serves all three).
# Installs what is missing when run as root; otherwise says what to install.
set -euo pipefail
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v spin >/dev/null 2>&1 || need+=(spin)
command -v wrk  >/dev/null 2>&1 || need+=(wrk)
command -v gcc  >/dev/null 2>&1 || need+=(gcc)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ip   >/dev/null 2>&1 || need+=(iproute2)
command -v node >/dev/null 2>&1 || need+=(nodejs)
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
