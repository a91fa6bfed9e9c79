"""The results as tables and ratios: printed at the end, and written as JSON and Markdown.

Rows are grouped by size, then by MTA (one table each), one line per
contender: with ``--repeat N`` its median round by e2e/s, and the range
over the rounds.  Ratios are taken within each round, each row against its
reference through the same MTA in the same round (the ceiling, the C
milter, the engines alone, its peer, the tuned bare milter); the report
shows their median and range.  The one-session rows (per-message time in
a single SMTP session) get a table of their own, and so do the workloads
where the scan cache saves work (:mod:`workloads`).  The ``cache`` column of
a MilterMonkey row is "off", or hits/lookups during the measurement.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
from pathlib import Path
from typing import Any

import messages
from contenders import ALL_CONTENDERS, REGISTRY
from measure import Row, fmt
from mtas import MTAS

from miltermonkey_core.testing.sendmail import sendmail_prefix

Column = tuple[str, str, int, int]

COLUMNS: list[Column] = [
    ("contender", "label", 34, 0),
    ("sent", "count", 5, 0),
    ("deliv", "delivered", 5, 0),
    ("e2e/s", "e2e_rate", 7, 1),
    ("inj/s", "inject_rate", 7, 1),
    ("p50ms", "p50_ms", 7, 1),
    ("p90ms", "p90_ms", 7, 1),
    ("p99ms", "p99_ms", 7, 1),
    ("milterCPU", "milter_cpu_ms", 9, 2),
    ("engCPU", "engines_cpu_ms", 7, 2),
    ("mtaCPU", "mta_cpu_ms", 7, 2),
    ("cliCPU", "client_cpu_ms", 6, 2),
    ("RSS MiB", "milter_peak_rss_mib", 8, 1),
    ("engRSS", "engines_peak_rss_mib", 7, 0),
    ("busy%", "box_busy_pct", 5, 0),
    ("cache", "cache", 9, 0),
]
#: With --repeat N > 1: the min and max over the rounds, after the column named.
RANGE_COLUMNS = {
    "e2e/s": ("e2e/s range", "e2e_range", 15, 1),
    "milterCPU": ("milterCPU range", "milter_cpu_range", 15, 2),
}
#: The one-session table: time per message from MAIL to the reply to the final dot.
SESSION_COLUMNS: list[Column] = [
    ("contender", "label", 34, 0),
    ("MTA", "mta", 8, 0),
    ("sent", "count", 5, 0),
    ("deliv", "delivered", 5, 0),
    ("p50ms", "msg_p50_ms", 7, 1),
    ("mean ms", "msg_mean_ms", 8, 1),
    ("p90ms", "msg_p90_ms", 7, 1),
    ("max ms", "msg_max_ms", 7, 1),
    ("milterCPU", "milter_cpu_ms", 9, 2),
    ("mtaCPU", "mta_cpu_ms", 7, 2),
    ("cache", "cache", 9, 0),
]
#: The workloads: each with the cache off and on, and the engines alone on the same mail.
WORKLOAD_COLUMNS: list[Column] = [
    ("workload", "label", 44, 0),
    ("cache", "cache", 6, 0),
    ("sent", "count", 5, 0),
    ("deliv", "delivered", 5, 0),
    ("msg/s", "e2e_rate", 7, 1),
    ("vs E3", "vs_engines", 6, 2),
    ("p50ms", "p50_ms", 7, 1),
    ("p50 to sink ms", "p50_delivery_ms", 14, 1),
    ("milterCPU", "milter_cpu_ms", 9, 2),
    ("engCPU", "engines_cpu_ms", 7, 2),
    ("milter+eng", "total_cpu_ms", 10, 2),
    ("hits/lookups", "hits", 12, 0),
    ("av hits", "av_hits", 7, 0),
    ("spam hits", "spam_hits", 9, 0),
    ("4xx", "tempfails", 4, 0),
    ("busy%", "box_busy_pct", 5, 0),
]
SESSION_RANGE = {"mean ms": ("mean ms range", "mean_range", 13, 1)}
SIZE_ORDER = (*messages.SIZES, "mix")
EN_DASH = "\u2013"  # ranges in the Markdown report (".." in the printed one)


def columns(repeat: int, base: list[Column] = COLUMNS,
            ranges: dict[str, Column] = RANGE_COLUMNS) -> list[Column]:
    out = []
    for col in base:
        out.append(col)
        if repeat > 1 and col[0] in ranges:
            out.append(ranges[col[0]])
    return out


def summarise(rows: list[Row]) -> list[Row]:
    """One line per contender (rows of one size): its median round by e2e/s, and the ranges.

    For an even number of rounds the lower of the two middle rounds is shown.
    Problems of every round are kept, each marked with its round.
    """
    groups: dict[tuple[str, Any], list[Row]] = {}
    for r in rows:
        groups.setdefault((r["contender"], r.get("mta")), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["e2e_rate"])
        line = dict(ranked[(len(ranked) - 1) // 2])
        line["rounds"] = len(group)
        rates = [r["e2e_rate"] for r in group]
        cpus = [r["milter_cpu_ms"] for r in group if r.get("milter_cpu_ms") is not None]
        line["e2e_range"] = (min(rates), max(rates))
        line["milter_cpu_range"] = (min(cpus), max(cpus)) if cpus else None
        if len(group) > 1:
            line["problems"] = [f"round {r.get('round', '?')}: {p}" for r in group
                                for p in r.get("problems") or []]
        out.append(line)
    return out


def summarise_sessions(rows: list[Row]) -> list[Row]:
    """One line per contender and MTA: the median round by mean time per message."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r["contender"], r["mta"]), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["msg_mean_ms"])
        line = dict(ranked[(len(ranked) - 1) // 2])
        means = [r["msg_mean_ms"] for r in group]
        line["mean_range"] = (min(means), max(means))
        if len(group) > 1:
            line["problems"] = [f"round {r.get('round', '?')}: {p}" for r in group
                                for p in r.get("problems") or []]
        out.append(line)
    return out


def _cell(v: Any, digits: int, sep: str) -> str:
    if isinstance(v, tuple | list):
        return sep.join(fmt(float(x), digits) for x in v)
    return fmt(v, digits) if isinstance(v, float) else fmt(v)


# --------------------------------------------------------------------------------------------
# ratios
# --------------------------------------------------------------------------------------------


def ratio_name(key: str, mta: str | None, size: str) -> str:
    return f"{key}/{size}" if mta in (None, "postfix") else f"{mta}:{key}/{size}"


def _ratios_one_round(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per size and MTA: each contender against the ceiling, engines alone, its peer, 2b, 2d."""
    out: dict[str, dict[str, float]] = {}
    by = {(r["contender"], r.get("mta"), r["size"]): r for r in rows}
    for r in rows:
        key, mta, size = r["contender"], r.get("mta"), r["size"]
        c = REGISTRY[key]
        if c.kind != "milter":
            continue
        entry: dict[str, float] = {}
        base = by.get(("none", mta, size))
        if base and key != "none":
            entry["vs_ceiling"] = r["e2e_rate"] / base["e2e_rate"]
        c_floor = by.get(("c-tuned", mta, size))
        if c_floor and c.vs_c:
            entry["vs_c_rate"] = r["e2e_rate"] / c_floor["e2e_rate"]
            if r.get("milter_cpu_ms") and c_floor.get("milter_cpu_ms"):
                entry["vs_c_cpu"] = r["milter_cpu_ms"] / c_floor["milter_cpu_ms"]
        eng = by.get(("engines", None, size))
        if eng and c.scanning:
            entry["vs_engines_alone"] = r["e2e_rate"] / eng["e2e_rate"]
        peer = by.get((c.peer, mta, size)) if c.peer else None
        if peer:
            entry["vs_peers_rate"] = r["e2e_rate"] / peer["e2e_rate"]
            if r.get("milter_cpu_ms") and peer.get("milter_cpu_ms"):
                entry["vs_peers_milter_cpu"] = r["milter_cpu_ms"] / peer["milter_cpu_ms"]
            if r.get("p50_ms") and peer.get("p50_ms"):
                entry["vs_peers_p50"] = r["p50_ms"] / peer["p50_ms"]
        serial = by.get((c.serial, mta, size)) if c.serial else None
        if serial:
            entry["overlap_rate_vs_serial"] = r["e2e_rate"] / serial["e2e_rate"]
            if r.get("p50_ms") and serial.get("p50_ms"):
                entry["overlap_p50_vs_serial"] = r["p50_ms"] / serial["p50_ms"]
        tuned = by.get(("bare-tuned", mta, size))
        if tuned and c.vs_bare_tuned:
            entry["vs_bare_tuned_rate"] = r["e2e_rate"] / tuned["e2e_rate"]
            if r.get("milter_cpu_ms") and tuned.get("milter_cpu_ms"):
                entry["vs_bare_tuned_cpu"] = r["milter_cpu_ms"] / tuned["milter_cpu_ms"]
                entry["mm_overhead_cpu_ms"] = r["milter_cpu_ms"] - tuned["milter_cpu_ms"]
        if entry:
            out[ratio_name(key, mta, size)] = entry
    # the client check: our client vs smtp-source on the ceiling
    for size in {r["size"] for r in rows}:
        ours, theirs = by.get(("none", "postfix", size)), by.get(("smtp-source", "postfix", size))
        if ours and theirs:
            out[f"client/{size}"] = {
                "python_client_e2e_rate": ours["e2e_rate"],
                "smtp_source_e2e_rate": theirs["e2e_rate"],
                "python_vs_smtp_source": ours["e2e_rate"] / theirs["e2e_rate"],
                "python_client_cpu_ms": ours["client_cpu_ms"],
                "smtp_source_cpu_ms": theirs["client_cpu_ms"]}
    return out


def _ratio_order(name: str) -> tuple[int, int, int]:
    mta, _, rest = name.rpartition(":")
    key, _, size = rest.rpartition("/")
    order = list(MTAS)
    m = order.index(mta) if mta in order else 0
    k = ALL_CONTENDERS.index(key) if key in ALL_CONTENDERS else len(ALL_CONTENDERS)
    return m, k, SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER)


def ratios(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """The ratios of each round (each row against its reference in the same round).

    With one round each entry holds the ratios.  With several, each holds the
    median over the rounds, plus ``range`` (min, max) and ``rounds`` (every
    round's value, in round order).
    """
    by_round: dict[int, list[Row]] = {}
    for r in rows:
        by_round.setdefault(r.get("round", 1), []).append(r)
    values: dict[str, dict[str, list[float]]] = {}
    for rnd in sorted(by_round):
        for name, one in _ratios_one_round(by_round[rnd]).items():
            slot = values.setdefault(name, {})
            for k, v in one.items():
                slot.setdefault(k, []).append(v)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(values, key=_ratio_order):
        got = values[name]
        entry: dict[str, Any] = {k: statistics.median(vs) for k, vs in got.items()}
        if len(by_round) > 1:
            entry["range"] = {k: [min(vs), max(vs)] for k, vs in got.items()}
            entry["rounds"] = got
        out[name] = entry
    return out


RATIO_NAMES = {
    "vs_ceiling": "rate vs ceiling (1)",
    "vs_c_rate": "rate vs C floor (2d)",
    "vs_c_cpu": "milter CPU vs C (2d)",
    "vs_engines_alone": "rate vs engines alone (E3)",
    "vs_peers_rate": "rate vs the peer (4; 4a, 4b for 5a, 5b)",
    "vs_peers_milter_cpu": "milter CPU vs the peer",
    "vs_peers_p50": "p50 latency vs the peer",
    "overlap_p50_vs_serial": "p50 with overlap / without (5s)",
    "overlap_rate_vs_serial": "rate with overlap / without (5s)",
    "vs_bare_tuned_rate": "rate vs bare tuned (2b)",
    "vs_bare_tuned_cpu": "milter CPU vs bare tuned (2b)",
    "mm_overhead_cpu_ms": "extra milter CPU ms/msg vs 2b",
    "python_vs_smtp_source": "python client rate / smtp-source rate",
}


def _ratio_text(entry: dict[str, Any], k: str, sep: str) -> str:
    """The (median) ratio, and with several rounds its range: ``0.84 (0.75..0.90)``."""
    text = f"{entry[k]:.2f}"
    rng = entry.get("range", {}).get(k)
    if rng is not None and len(entry["rounds"][k]) > 1:
        text += f" ({rng[0]:.2f}{sep}{rng[1]:.2f})"
    return text


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _size_heading(sub: list[Row], repeat: int) -> str:
    text = (f"a set of {sub[0].get('set_size')} messages, {sub[0]['concurrency']} sessions")
    if repeat > 1:
        text += f"; the median of {repeat} rounds by e2e/s, with the range over the rounds"
    return text


def tables(data: dict[str, Any]) -> list[tuple[str, str, list[Row]]]:
    """(size, "" or " through MTA", rows) per table, in the order they are shown.

    The rows without an MTA (the engines alone) go into the first MTA's table.
    """
    mtas = list(data["args"].get("mta") or ["postfix"])
    out = []
    for size in data["args"]["sizes"]:
        for i, mta in enumerate(mtas):
            sub = [r for r in data["results"] if r["size"] == size
                   and (r.get("mta", "postfix") == mta
                        or (i == 0 and r.get("mta", "postfix") not in mtas))]
            if sub:
                via = "" if mtas == ["postfix"] else f" through {MTAS[mta].title}"
                out.append((size, via, sub))
    return out


def _workload_heading(data: dict[str, Any]) -> str:
    r = data["workloads"][0]
    return (f"workloads where the scan cache saves work: the mix set, {r['set_size']} "
            f"messages (mean {r['mean_kib']} KiB), {r['concurrency']} sessions, each with the "
            "cache off and on; msg/s is messages (bulk: transactions) delivered at the sink "
            "over the time until the last one was; vs E3 against the engines alone on the "
            "same unique mail, measured right before each workload")


def _workload_rows(data: dict[str, Any]) -> list[Row]:
    out = []
    for r in data["workloads"]:
        line = dict(r)
        line["tempfails"] = (r.get("verdicts") or {}).get("tempfail") \
            if r["workload"] == "retries" else None
        out.append(line)
    return out


def workload_goals(data: dict[str, Any]) -> list[str]:
    """What the rows say against the issue's goals: bulk with the cache on, 3x the engines."""
    out = []
    by = {(r["workload"], r.get("host", ""), r["cache"]): r for r in data.get("workloads", [])}
    for (wl, host, cache), r in by.items():
        if cache in ("off", "-"):
            continue
        off = by.get((wl, host, "off"))
        if off and off.get("e2e_rate") and r.get("e2e_rate"):
            where = f"{wl}{' ' + host if host else ''}"
            out.append(f"{where}: cache on / off rate {r['e2e_rate'] / off['e2e_rate']:.2f}, "
                       f"milter+engine CPU {fmt(r.get('total_cpu_ms'), 2)} vs "
                       f"{fmt(off.get('total_cpu_ms'), 2)} ms/msg, p50 "
                       f"{fmt(r.get('p50_ms'))} vs {fmt(off.get('p50_ms'))} ms")
    bulk = by.get(("bulk", "", "memory"))
    if bulk and bulk.get("vs_engines") is not None:
        met = "met" if bulk["vs_engines"] >= 3 else "NOT met"
        out.append(f"goal, bulk with the cache on at least 3x the engines alone: "
                   f"{bulk['vs_engines']:.2f}x ({met})")
    return out


def _session_heading(data: dict[str, Any]) -> str:
    rows = data.get("sessions") or []
    repeat = int(data["args"].get("repeat", 1))
    text = (f"one SMTP session: {rows[0]['count']} messages of {rows[0]['mean_kib']} KiB one "
            "after another, time per message from MAIL to the reply to the final dot, ms")
    if repeat > 1:
        text += f"; the median of {repeat} rounds by mean, with the range"
    return text


def text_report(data: dict[str, Any]) -> str:
    lines = []
    repeat = int(data["args"].get("repeat", 1))
    cols = columns(repeat)
    for size, via, sub in tables(data):
        mean = sub[0]["mean_kib"]
        lines.append(f"\n--- size {size}{via} (mean {mean} KiB): {_size_heading(sub, repeat)}; "
                     f"the set sent more than once where --min-time asked for it; "
                     f"CPU in ms per message ---")
        lines += _text_table(cols, summarise(sub))
    if data.get("sessions"):
        lines.append(f"\n--- {_session_heading(data)}; CPU in ms per message ---")
        lines += _text_table(columns(repeat, SESSION_COLUMNS, SESSION_RANGE),
                             summarise_sessions(data["sessions"]))
    if data.get("workloads"):
        lines.append(f"\n--- {_workload_heading(data)}; CPU in ms per message ---")
        lines += _text_table(WORKLOAD_COLUMNS, _workload_rows(data))
        lines += [f"  {g}" for g in workload_goals(data)]
    if data["ratios"]:
        lines.append("\n--- ratios (e2e msg/s unless stated)"
                     + (f"; median of {repeat} rounds (min..max)" if repeat > 1 else "")
                     + " ---")
        width = max(26, *(len(name) for name in data["ratios"]))
        for name, entry in data["ratios"].items():
            parts = [f"{RATIO_NAMES[k]} {_ratio_text(entry, k, '..')}" for k in RATIO_NAMES
                     if k in entry]
            lines.append(f"{name:<{width}} " + ", ".join(parts))
    if data["skipped"]:
        lines.append("\n--- skipped ---")
        lines += [f"{k}: {v}" for k, v in data["skipped"].items()]
    if data["memory"]:
        lines.append("\n--- memory ---")
        lines += [f"{k}: {json.dumps(v)}" for k, v in data["memory"].items()]
    return "\n".join(lines)


def _text_table(cols: list[Column], rows: list[Row]) -> list[str]:
    lines = [" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, _k, w, _d) in enumerate(cols))]
    for r in rows:
        cells = []
        for i, (_h, k, w, d) in enumerate(cols):
            s = _cell(r.get(k), d, "..")
            cells.append(f"{s:<{w}}" if i == 0 else f"{s:>{w}}")
        flag = "  <-- " + "; ".join(r["problems"]) if r.get("problems") else ""
        lines.append(" ".join(cells) + flag)
    return lines


def _markdown_table(cols: list[Column], rows: list[Row]) -> list[str]:
    out = ["| " + " | ".join(h for h, *_ in cols) + " | problems |",
           "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [_cell(r.get(k), d, EN_DASH) for _h, k, _w, d in cols]
        out.append("| " + " | ".join(cells) + " | " + ("; ".join(r.get("problems") or [])
                                                    or "") + " |")
    return [*out, ""]


def markdown_report(data: dict[str, Any]) -> str:
    repeat = int(data["args"].get("repeat", 1))
    cols = columns(repeat)
    out = [f"# MilterMonkey benchmark, {data['started']}", "",
           f"Command: `{data['command']}`", "",
           f"Machine: {data['machine']['cpu']} x {data['machine']['cores']}, "
           f"{data['machine']['mem_gib']} GiB, {data['machine']['os']}, kernel "
           f"{data['machine']['kernel']}; load average at start {data['machine']['loadavg']}"
           + (f", at the end {data['loadavg_end']}" if data.get("loadavg_end") else ""), "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), "",
           "CPU columns are milliseconds of CPU per message (milter processes incl. children; "
           "clamd+spamd; the MTA; the load client). RSS is the milter's peak, summed over its "
           "processes. busy% is the whole machine (other load included).", ""]
    if repeat > 1:
        out += [f"Each size was measured in {repeat} interleaved rounds. A row is the "
                "contender's median round by e2e/s; the ranges are the min and max over the "
                "rounds. Ratios are taken within each round; the table shows their median and, "
                "in brackets, their min and max.", ""]
    for size, via, sub in tables(data):
        out += [f"## {size}{via} (mean {sub[0]['mean_kib']} KiB, "
                f"{_size_heading(sub, repeat)})", ""]
        out += _markdown_table(cols, summarise(sub))
    if data.get("sessions"):
        out += [f"## One SMTP session ({_session_heading(data).split(': ', 1)[1]})", ""]
        out += _markdown_table(columns(repeat, SESSION_COLUMNS, SESSION_RANGE),
                               summarise_sessions(data["sessions"]))
    if data.get("workloads"):
        out += [f"## Workloads ({_workload_heading(data)})", ""]
        out += _markdown_table(WORKLOAD_COLUMNS, _workload_rows(data))
        out += [*(f"- {g}" for g in workload_goals(data)), ""]
    if data["ratios"]:
        # only the columns this run has values for
        used = [k for k in RATIO_NAMES if any(k in e for e in data["ratios"].values())]
        out += ["## Ratios", "", "| what | " + " | ".join(RATIO_NAMES[k] for k in used) + " |",
                "|" + "---|" * (len(used) + 1)]
        for name, entry in data["ratios"].items():
            out.append(f"| {name} | " + " | ".join(
                _ratio_text(entry, k, EN_DASH) if k in entry else "" for k in used) + " |")
        out.append("")
    if data["checks"]:
        out += ["## Functional checks", ""]
        for k, v in data["checks"].items():
            out.append(f"- **{k}**: " + "; ".join(v))
        out.append("")
    if data["skipped"]:
        out += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in data["skipped"].items()] + [""]
    if data["memory"]:
        out += ["## Memory", ""] + [f"- **{k}**: `{json.dumps(v)}`"
                                    for k, v in data["memory"].items()] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# where it ran
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    osname = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "os": osname,
            "kernel": platform.release(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "hostname": socket.gethostname()}


def versions(mtas: list[str] | None = None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("postfix", "clamav-daemon", "clamav-milter", "spamd", "spamass-milter",
                "mimedefang"):
        with contextlib.suppress(Exception):
            v = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg],
                               capture_output=True, text=True, timeout=10, check=False).stdout
            if v:
                out[pkg] = v
    if "sendmail" in (mtas or []):
        # unpacked privately, not installed: dpkg does not know it
        with contextlib.suppress(OSError):
            out["sendmail-bin"] = (sendmail_prefix() / "VERSION").read_text().strip()
    for dist in ("pymilter", "miltermonkey-core", "miltermonkey-av", "miltermonkey-spam"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out
