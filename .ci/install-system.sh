#!/usr/bin/env bash
# Install what the MilterMonkey test suite needs on a fresh Debian 12 machine.
#
# Run as root.  Safe to run again: apt-get and pip leave installed packages
# alone.  The tests start their own private Postfix, clamd and spamd on
# loopback (miltermonkey_core/testing/stack.py), so the system instances
# these packages ship must not be started, configured or left running.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system.sh: must run as root (apt-get, and the tests need root for Postfix)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Maintainer scripts ask invoke-rc.d whether they may start a service;
# policy-rc.d answering 101 ("forbidden") keeps postfix, clamd, freshclam and
# spamd from starting during installation.  Only a file we created is removed.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from .ci/install-system.sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
fi

# Postfix asks what kind of mail server to configure.  "No configuration"
# leaves /etc/postfix/main.cf absent: only the tests' private instances run.
debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF

apt-get update
# libmilter-dev, build-essential, python3-dev: pymilter compiles against libmilter.
# python3-pip: "python3 -m pip" below (Debian's python3 comes without pip).
apt-get install -y --no-install-recommends \
    libmilter-dev build-essential python3-dev python3-pip \
    postfix swaks \
    clamav clamav-daemon clamdscan clamav-milter \
    spamassassin spamd spamc spamass-milter

# spamassassin's postinst imports the sa-update keys and leaves a gpg-agent
# running for that keyring.  Stop exactly that agent, addressed by its
# homedir (never by process name).
SA_KEYS=/var/lib/spamassassin/sa-update-keys
if [ -d "$SA_KEYS" ] && command -v gpgconf >/dev/null; then
    gpgconf --homedir "$SA_KEYS" --kill gpg-agent 2>/dev/null || true
fi

# nox drives the test sessions; each session builds its own virtualenv.
# Debian 12 marks its python3 "externally managed" (PEP 668) and pip then
# refuses to install; on a throwaway CI machine the system interpreter is
# ours, so say so explicitly rather than fail.
pip_err=$(mktemp)
if ! python3 -m pip install -q nox 2>"$pip_err"; then
    if grep -q externally-managed-environment "$pip_err"; then
        python3 -m pip install -q --break-system-packages nox
    else
        cat "$pip_err" >&2
        rm -f "$pip_err"
        exit 1
    fi
fi
rm -f "$pip_err"

echo "install-system.sh: done ($(postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /'),"\
     "$(clamd --version 2>/dev/null | cut -d/ -f1), $(spamd --version 2>/dev/null | head -n1),"\
     "nox $(python3 -m nox --version 2>&1 | tail -n1))"
