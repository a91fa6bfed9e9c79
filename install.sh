#!/bin/sh
# Install MilterMonkey from this checkout into the virtualenv /opt/miltermonkey,
# with the distribution's own Python.  Run as root, from anywhere:
#
#     sh install.sh && /opt/miltermonkey/bin/miltermonkey run
#
# Debian 12 and Ubuntu 24.04 mark their python3 "externally managed" (PEP 668):
# pip refuses to install into it, and pip is not even installed.  A virtualenv
# of the system's /usr/bin/python3 is the supported way: it needs only the
# python3-venv package, leaves the system's Python alone, and gives the daemon
# one fixed path (/opt/miltermonkey/bin/miltermonkey) for the systemd unit.
# Nothing needs a compiler: the core, the av and the spam brains and their
# dependencies are pure Python.
#
# What it does, each step skipped when already done (so it also upgrades an
# installation from a newer checkout):
#   1. apt-get install python3-venv, if /usr/bin/python3 cannot make a virtualenv;
#   2. /usr/bin/python3 -m venv /opt/miltermonkey;
#   3. pip install this checkout's miltermonkey-core, miltermonkey-av and
#      miltermonkey-spam into it (dependencies from your package index);
#   4. miltermonkey key generate /etc/mail/miltersecret, when there is none: the
#      milter key secret, mode 0600, used once milter_key = true is set.
#
# MILTERMONKEY_VENV=/other/path installs elsewhere.
set -eu

VENV=${MILTERMONKEY_VENV:-/opt/miltermonkey}
PYTHON=/usr/bin/python3
SECRET=/etc/mail/miltersecret
SRC=$(cd "$(dirname "$0")" && pwd)

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: it may apt-get install python3-venv and writes $VENV"
[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/miltermonkey_core" ] \
    || die "$SRC is not a MilterMonkey checkout (no pyproject.toml and miltermonkey_core/)"

# 1. A Python that can make virtualenvs.  Debian splits venv/ensurepip out of
#    python3 into python3-venv; a minimal image may lack python3 itself.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    say "installing python3-venv with apt-get ($PYTHON cannot create a virtualenv yet)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y python3 python3-venv \
        || { apt-get update && apt-get install -y python3 python3-venv; }
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "MilterMonkey needs Python 3.11 or later; $PYTHON is $("$PYTHON" -V 2>&1) (Debian 12 and Ubuntu 24.04 have 3.11 and 3.12)"

# 2. The virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtualenv $VENV with $PYTHON ($("$PYTHON" -V 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi

# 3. The packages.  pip reinstalls a local directory every time, so a re-run
#    from a newer checkout replaces the code even when the version is the same.
#    setuptools builds in each directory's build/, which keeps modules deleted
#    since the last build and would put them in the new wheel: it goes first.
say "installing miltermonkey-core, miltermonkey-av and miltermonkey-spam from $SRC into $VENV"
for dir in "$SRC" "$SRC/plugins/miltermonkey-av" "$SRC/plugins/miltermonkey-spam"; do
    rm -rf "$dir/build"
done
"$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
    "$SRC" "$SRC/plugins/miltermonkey-av" "$SRC/plugins/miltermonkey-spam"

# 4. The milter key secret, created once and never replaced.
if [ -e "$SECRET" ]; then
    say "keeping the milter key secret $SECRET"
else
    install -d -m 0755 "$(dirname "$SECRET")"
    "$VENV/bin/miltermonkey" key generate "$SECRET"
fi

say "installed $("$VENV/bin/miltermonkey" --version) in $VENV"
say "brains: $("$VENV/bin/miltermonkey" brains | sed -n 's/^\([a-z_][a-z0-9_-]*\)  (.*/\1/p' | tr '\n' ' ')"
say "next: $VENV/bin/miltermonkey run   (embedded default: inet:8890@127.0.0.1, the trivial brain)"
say "      $VENV/bin/miltermonkey systemd-unit   (a unit file for systemd)"
