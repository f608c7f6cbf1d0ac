#!/usr/bin/env bash
# Provide the headless browser the dashboard's browser test drives: Debian's `chromium`.
#
#   scripts/browser.sh          install it when missing (apt-get, as root); prints its path
#   scripts/browser.sh check    only check; exit 1 saying what to install
#
# Idempotent. Not root and chromium missing: fails saying which Debian package to install.
# The test finds the browser at $HOMEOSTAT_CHROMIUM, else /usr/bin/chromium, else on PATH.
set -euo pipefail

die() {
    echo "browser.sh: $*" >&2
    exit 1
}

find_chromium() {
    if [ -n "${HOMEOSTAT_CHROMIUM:-}" ] && [ -x "$HOMEOSTAT_CHROMIUM" ]; then
        echo "$HOMEOSTAT_CHROMIUM"
    elif [ -x /usr/bin/chromium ]; then
        echo /usr/bin/chromium
    else
        command -v chromium 2>/dev/null || true
    fi
}

mode="${1:-install}"
case "$mode" in
install | check) ;;
*) die "usage: $0 [install|check]" ;;
esac

found="$(find_chromium)"
if [ -n "$found" ]; then
    echo "$found"
    exit 0
fi
[ "$mode" = check ] && die "chromium is missing (install: apt-get install chromium)"
[ "$(id -u)" -eq 0 ] || die "chromium is missing; not root, so install it yourself: sudo apt-get install chromium"
command -v apt-get >/dev/null 2>&1 || die "chromium is missing, and apt-get is not available to install it"

echo "browser.sh: installing chromium" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# fonts-liberation: text in the screenshot renders with real glyphs.
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null ||
    die "apt-get install chromium failed"
found="$(find_chromium)"
[ -n "$found" ] || die "chromium still missing after install"
echo "$found"
