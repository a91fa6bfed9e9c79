#!/usr/bin/env bash
# Install what the MilterMonkey test suite needs on a fresh Debian 12 machine.
#
# Run as root.  Safe to run again: apt-get and pip leave installed packages
# alone.  The tests start their own private Postfix, clamd and spamd on
# loopback (miltermonkey_core/testing/ and the brains' testing/ packages),
# so the system instances these packages ship must not be started,
# configured or left running.
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
    spamassassin spamd spamc spamass-milter \
    redis-server
# HAProxy balances milter sessions over the monkey hosts of nox -s fleet
# (tests/fleet/); iproute2 gives the hosts their network namespaces.
apt-get install -y --no-install-recommends haproxy iproute2

# spamassassin's postinst imports the sa-update keys and leaves a gpg-agent
# running for that keyring.  Stop exactly that agent, addressed by its
# homedir (never by process name).
SA_KEYS=/var/lib/spamassassin/sa-update-keys
if [ -d "$SA_KEYS" ] && command -v gpgconf >/dev/null; then
    gpgconf --homedir "$SA_KEYS" --kill gpg-agent 2>/dev/null || true
fi

# Sendmail, for tests/e2e/test_e2e_sendmail.py.  Debian's sendmail-bin conflicts
# with postfix (both are the mail-transport-agent), so it is never installed:
# sendmail-bin, sendmail-base and sendmail-cf of the same version are
# unpacked into a private prefix and the tests run the binary from there
# with a .cf of their own (miltermonkey_core/testing/sendmail.py).  No
# maintainer script runs, so no system Sendmail is configured or started and
# /etc/mail stays untouched.  Only m4 (to build the .cf) and the binary's
# shared libraries are installed as packages.
SENDMAIL_PREFIX=${MILTERMONKEY_SENDMAIL_PREFIX:-/opt/miltermonkey-test/sendmail}
SENDMAIL_DEBS=$SENDMAIL_PREFIX.debs
sm_version=$(apt-cache policy sendmail-bin | sed -n 's/^ *Candidate: *//p')
if [ -z "$sm_version" ] || [ "$sm_version" = "(none)" ]; then
    echo "install-system.sh: no sendmail-bin package in the apt sources" >&2
    exit 1
fi
if [ "$(cat "$SENDMAIL_PREFIX/VERSION" 2>/dev/null)" != "$sm_version" ]; then
    rm -rf "$SENDMAIL_DEBS" "$SENDMAIL_PREFIX.new"
    install -d -m 0755 "$SENDMAIL_DEBS" "$SENDMAIL_PREFIX.new"
    # apt downloads as its _apt user, which needs to write here (else it warns).
    if id _apt >/dev/null 2>&1; then chown _apt "$SENDMAIL_DEBS"; fi
    (cd "$SENDMAIL_DEBS" && apt-get download -q \
        "sendmail-bin=$sm_version" "sendmail-base=$sm_version" "sendmail-cf=$sm_version")
    for deb in "$SENDMAIL_DEBS"/*.deb; do
        dpkg-deb -x "$deb" "$SENDMAIL_PREFIX.new"
    done
    # The libraries sendmail-bin links against, read from its own Depends.
    sm_libs=$(dpkg-deb -f "$SENDMAIL_DEBS"/sendmail-bin_*.deb Depends \
        | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/[[:space:]]//g' | grep '^lib' || true)
    if [ -n "$sm_libs" ]; then
        # shellcheck disable=SC2086  # one package name per word
        apt-get install -y --no-install-recommends $sm_libs
    fi
    echo "$sm_version" > "$SENDMAIL_PREFIX.new/VERSION"
    # Sendmail refuses a .cf or helpfile below a group- or world-writable directory.
    chown -R root:root "$SENDMAIL_PREFIX.new"
    chmod -R go-w "$SENDMAIL_PREFIX.new"
    rm -rf "$SENDMAIL_PREFIX"
    mv "$SENDMAIL_PREFIX.new" "$SENDMAIL_PREFIX"
    rm -rf "$SENDMAIL_DEBS"
fi
apt-get install -y --no-install-recommends m4
if ldd "$SENDMAIL_PREFIX/usr/libexec/sendmail/sendmail" | grep 'not found'; then
    echo "install-system.sh: $SENDMAIL_PREFIX's sendmail lacks shared libraries" >&2
    exit 1
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
     "sendmail $(cat "$SENDMAIL_PREFIX/VERSION"),"\
     "$(clamd --version 2>/dev/null | cut -d/ -f1), $(spamd --version 2>/dev/null | head -n1),"\
     "nox $(python3 -m nox --version 2>&1 | tail -n1))"
