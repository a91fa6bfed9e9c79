#!/usr/bin/env bash
# Run the README's first command exactly as written, as a new user would on a
# stock Debian machine, and check that it leaves a working milter.
#
# The command is read from README.md, from the block between the
# "<!-- first-command" and "<!-- /first-command -->" markers, so the README and
# CI cannot drift apart.  It runs as root with Debian's default PATH (no pyenv
# or other interpreter in front of /usr/bin/python3).  Since it ends by running
# the milter in the foreground, it is started in a session of its own; once
# 127.0.0.1:8890 answers, one message goes through the milter protocol and
# must come back with the trivial brain's X-MilterMonkey header; then the
# whole session gets SIGTERM and the daemon must exit 0.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=/opt/miltermonkey
PORT=8890
START_TIMEOUT=${MILTERMONKEY_FIRST_COMMAND_TIMEOUT:-900}  # pip downloads included

block=$(sed -n '/^<!-- first-command/,/^<!-- \/first-command -->/p' README.md)
command=$(printf '%s\n' "$block" \
    | grep -v -e '^<!--' -e '^```' -e '^[[:space:]]*#' -e '^[[:space:]]*$' || true)
lines=$(printf '%s' "$command" | grep -c '' || true)
if [ "$lines" -ne 1 ]; then
    echo "readme-first-command: README.md must hold exactly one command line between the" \
         "first-command markers; found $lines:" >&2
    printf '%s\n' "$block" >&2
    exit 1
fi

# The docs' getting-started page promises the README's commands word for word.
if ! grep -qxF -- "$command" docs/getting-started.md; then
    echo "readme-first-command: docs/getting-started.md does not show the README's first" \
         "command: $command" >&2
    exit 1
fi

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "readme-first-command: something already listens on 127.0.0.1:$PORT" >&2
    exit 1
fi

log=$(mktemp /tmp/readme-first-command.XXXXXX)
echo "+ $command"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    setsid bash -c "$command" >"$log" 2>&1 </dev/null &
pid=$!

# On failure: the whole session started here (the shell, pip, the daemon).
stop() {
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || true
    fi
}
trap 'stop; sed "s/^/    | /" "$log"; rm -f "$log"' EXIT

deadline=$((SECONDS + START_TIMEOUT))
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" && status=0 || status=$?
        echo "readme-first-command: the command exited ($status) before the milter listened" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "readme-first-command: nothing listened on 127.0.0.1:$PORT within" \
             "${START_TIMEOUT}s" >&2
        exit 1
    fi
    sleep 1
done
echo "readme-first-command: 127.0.0.1:$PORT answers after ${SECONDS}s"

# The virtualenv is Debian's Python, and the milter answers a real session.
"$VENV/bin/python" - "$PORT" <<'EOF'
import sys

from miltermonkey_core.testing.client import MessageSpec, run_session

port = int(sys.argv[1])
print(f"readme-first-command: {sys.prefix} runs {sys.base_prefix}/bin/python3 "
      f"{sys.version.split()[0]}")
if sys.base_prefix != "/usr":
    sys.exit(f"readme-first-command: the virtualenv is not Debian's /usr/bin/python3 "
             f"(base prefix {sys.base_prefix})")
raw = b"From: <a@example.test>\r\nTo: <b@example.test>\r\nSubject: first command\r\n\r\nhi\r\n"
(result,) = run_session(("127.0.0.1", port),
                        [MessageSpec(raw, "<a@example.test>", ["<b@example.test>"])])
added = result.applied.header_values("X-MilterMonkey") if result.accepted else []
if not added:
    sys.exit(f"readme-first-command: the milter did not add X-MilterMonkey: {result}")
print(f"readme-first-command: a milter session got X-MilterMonkey: {added[0]}")
EOF

# Stop the daemon the way an admin (or systemd) does: SIGTERM to the process of
# `miltermonkey run` (its supervisor).  The shell may have exec'd it as the
# last command of the line, or still wait for it as its one child.  `run`
# execs the supervisor afresh in the same pid, so its arguments read
# `python3 -m miltermonkey_core.server.supervisor ...` by then.
supervisor_args='miltermonkey run|-m miltermonkey_core\.server\.supervisor'
if ps -o args= -p "$pid" | grep -qE "$supervisor_args"; then
    daemon=$pid
else
    daemon=$(ps -o pid= --ppid "$pid" | tr -d ' ')
fi
if [ -z "$daemon" ] || [ "$(printf '%s\n' "$daemon" | grep -c '')" -ne 1 ] \
        || ! ps -o args= -p "$daemon" | grep -qE "$supervisor_args"; then
    echo "readme-first-command: cannot tell the process of 'miltermonkey run' under" \
         "pid $pid: ${daemon:-none}" >&2
    exit 1
fi
echo "readme-first-command: $(ps -o pid=,args= -p "$daemon")"
kill -TERM "$daemon"
end=$((SECONDS + 60))
while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.2; done
if kill -0 "$pid" 2>/dev/null; then
    echo "readme-first-command: the milter did not stop within 60 s of SIGTERM" >&2
    exit 1
fi
wait "$pid" && status=0 || status=$?
if [ "$status" -ne 0 ]; then
    echo "readme-first-command: the command exited $status after SIGTERM" >&2
    exit 1
fi
echo "readme-first-command: stopped cleanly on SIGTERM; the command's output:"
