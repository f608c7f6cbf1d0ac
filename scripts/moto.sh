#!/usr/bin/env bash
# Provides the moto server (PyPI `moto[server]`), the EC2-compatible endpoint the `ec2` power
# provider is tested against, and prints the path of its `moto_server` executable on stdout.
#
# moto lives in a Python virtual environment, by default
# ${XDG_CACHE_HOME:-$HOME/.cache}/homeostat/moto-venv (HOMEOSTAT_MOTO_VENV overrides it). The
# first run creates it and installs moto from PyPI; later runs find it and print the path
# silently. Safe to run concurrently (the install holds a lock). Needs python3 (3.9 or newer,
# with its venv module; PYTHON names another interpreter).
#
# Usage: scripts/moto.sh            # prints /path/to/moto-venv/bin/moto_server
set -euo pipefail

# The moto release line the provider is tested against.
MOTO_REQUIREMENT='moto[server]>=5.1,<6'

venv="${HOMEOSTAT_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/homeostat/moto-venv}"
python="${PYTHON:-python3}"

say() { echo "moto.sh: $*" >&2; }

ready() {
    [ -x "$venv/bin/moto_server" ] && "$venv/bin/python" -c 'import moto.server' >/dev/null 2>&1
}

if ready; then
    echo "$venv/bin/moto_server"
    exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
    say "$python is missing: install Python 3.9+ with its venv module (Debian: apt-get install python3-venv)"
    exit 1
fi
if ! "$python" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
    say "$python is older than 3.9 or has no venv module (Debian: apt-get install python3-venv)"
    exit 1
fi

mkdir -p "$(dirname "$venv")"
install() {
    # Another run may have finished the install while this one waited for the lock.
    if ready; then
        return 0
    fi
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
        say "creating a Python virtual environment in $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi
    say "installing $MOTO_REQUIREMENT from PyPI (once; takes a minute)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$MOTO_REQUIREMENT" >&2
    if ! ready; then
        say "installed $MOTO_REQUIREMENT but $venv/bin/moto_server does not run"
        exit 1
    fi
}

if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv.lock"
    flock 9
fi
install
echo "$venv/bin/moto_server"
