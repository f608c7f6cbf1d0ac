#!/usr/bin/env bash
# Provide the tools the pool-provider tests drive: OpenIPMI's BMC simulator (`ipmi_sim`), `ipmitool`
# (the second IPMI client), Debian's `wakeonlan` (the second Wake-on-LAN sender) and `dnsmasq`
# (DNS TXT configuration for joining machines).
#
#   scripts/pool-tools.sh          install what is missing (apt-get, as root); quiet when all present
#   scripts/pool-tools.sh check    only check; exit 1 naming what is missing
#
# Idempotent. Not root and something missing: fails saying which Debian packages to install.
set -euo pipefail

# command -> Debian package
declare -A PACKAGE_OF=(
    [ipmi_sim]=openipmi
    [ipmitool]=ipmitool
    [wakeonlan]=wakeonlan
    [dnsmasq]=dnsmasq
)

die() {
    echo "pool-tools.sh: $*" >&2
    exit 1
}

missing_packages() {
    local cmd
    for cmd in "${!PACKAGE_OF[@]}"; do
        # dnsmasq lives in /usr/sbin, which a non-root PATH may lack.
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
            echo "${PACKAGE_OF[$cmd]}"
        fi
    done | sort -u
}

mode="${1:-install}"
case "$mode" in
install | check) ;;
*) die "usage: $0 [install|check]" ;;
esac

mapfile -t missing < <(missing_packages)
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$mode" = check ]; then
    die "missing Debian packages: ${missing[*]} (install: apt-get install ${missing[*]})"
fi
if [ "$(id -u)" -ne 0 ]; then
    die "missing Debian packages: ${missing[*]}; not root, so install them yourself: sudo apt-get install ${missing[*]}"
fi
command -v apt-get >/dev/null 2>&1 ||
    die "missing Debian packages: ${missing[*]}, and apt-get is not available to install them"

echo "pool-tools.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# dnsmasq's package would start a system-wide resolver on port 53; the tests start their own on
# loopback. policy-rc.d tells invoke-rc.d not to start services during this install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
status=0
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
[ "$created_policy" -eq 1 ] && rm -f "$policy"
[ "$status" -eq 0 ] || die "apt-get install ${missing[*]} failed (exit $status)"

mapfile -t still < <(missing_packages)
[ "${#still[@]}" -eq 0 ] || die "still missing after install: ${still[*]}"
