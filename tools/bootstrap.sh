#!/usr/bin/env bash
# Install netwatch and everything it needs on Debian 12 (run as root), then
#   demo  - run the service: `netwatch run` when a config with VMs exists,
#           else a self-contained demo on a sandbox (the default)
#   test  - lint, type-check and run the full test suite
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-demo}

if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: run as root (netwatch manages host links; its tests make network namespaces)" >&2
    exit 2
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v ip >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
command -v systemd-analyze >/dev/null || need+=(systemd)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ "$what" = test ]; then
    # The tests that run netwatch where admins do: a real systemd (a Debian
    # tree booted with systemd-nspawn) and libvirt's daemons.
    command -v systemd-nspawn >/dev/null || need+=(systemd-container)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v libvirtd >/dev/null || need+=(libvirt-daemon-system)
    command -v virsh >/dev/null || need+=(libvirt-clients)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing ${need[*]}"
    apt-get update -q
    # Installing must not start or enable services on this host (libvirtd,
    # for one, is only wanted by the tests, which start their own).
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" || status=$?
    [ -z "$policy" ] || rm -f "$policy"
    [ "${status:-0}" = 0 ] || exit "$status"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

case "$what" in
demo)
    config=${NETWATCH_CONFIG:-/etc/netwatch/netwatch.toml}
    if [ -f "$config" ] && grep -q '^\[\[vm\]\]' "$config"; then
        exec .venv/bin/netwatch run -c "$config"
    fi
    echo "bootstrap: no VM configured in $config: running the sandboxed demo"
    exec .venv/bin/netwatch demo
    ;;
test)
    .venv/bin/ruff check netwatch tests bench
    .venv/bin/mypy
    exec .venv/bin/pytest -p no:cacheprovider
    ;;
*)
    echo "usage: $0 [demo|test]" >&2
    exit 2
    ;;
esac
