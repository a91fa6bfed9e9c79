"""Network namespaces on a private bridge: several "hosts" on one machine, for fleet tests.

A fleet drill needs monkey hosts that can die, lose their link or drain on
their own while the rest carries on, each with its own addresses and ports
the way separate machines have them.  :class:`BridgeNetwork` builds that
from network namespaces:

* one Linux bridge in the root namespace holding the subnet's ``.1``
  address (the balancer, Redis and the engines listen there);
* per host a namespace with a veth pair: the root end is a port of the
  bridge, the other end is ``eth0`` inside the namespace with the host's
  address ``.11``, ``.12``...; ``lo`` is up too;
* **no default route** in any namespace, and the subnet exists only on
  this bridge: nothing a host runs can reach another network.

Everything is named after the creating process (``mmf<pid>``), so parallel
runs do not collide and a later run can tell leftovers of a crashed one
(whose pid is gone) from a live run's: :func:`sweep_leftovers` removes only
those.  :meth:`BridgeNetwork.destroy` kills what still runs inside the
namespaces (processes this run started there, found by namespace, never by
name), deletes the namespaces (which takes their veths along) and the
bridge; it runs at interpreter exit too, so a failing test leaves nothing.

A UNIX socket is a file, not part of a network namespace: a daemon in the
root namespace listening on a socket path (clamd's) serves every host.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from miltermonkey_core.testing.process import (
    StackError,
    binary,
    is_root,
    pid_alive,
    run_command,
    wait_until,
)

__all__ = ["BridgeNetwork", "NetnsHost", "free_subnet", "sweep_leftovers"]

#: Every name this module creates starts with this, then the creating pid.
PREFIX = "mmf"
_NAME = re.compile(rf"^{PREFIX}(\d+)(?:-h\d+|br|h\d+)$")
#: Where the subnets are picked from: 10.217.0.0/24 ... 10.217.255.0/24.
_SUBNET_BASE = ipaddress.IPv4Network("10.217.0.0/16")

_LIVE: set[BridgeNetwork] = set()


@atexit.register
def _destroy_leftovers() -> None:
    for network in list(_LIVE):
        with contextlib.suppress(Exception):
            network.destroy()


def _ip(*args: str, timeout: float = 30.0) -> str:
    status, out = run_command([binary("ip"), *args], timeout)
    if status != 0:
        raise StackError(f"ip {' '.join(args)} failed ({status}): {out.strip()}")
    return out


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address or a route in."""
    used = []
    for line in (_ip("-4", "-o", "addr", "show") + _ip("-4", "route", "show", "table", "all")
                 ).splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                if "/" in word or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", word):
                    used.append(ipaddress.IPv4Network(word, strict=False))
    return used


def free_subnet(seed: int | None = None) -> ipaddress.IPv4Network:
    """A /24 of 10.217.0.0/16 that no address or route of this machine overlaps."""
    used = _networks_in_use()
    candidates = list(_SUBNET_BASE.subnets(new_prefix=24))
    start = (os.getpid() if seed is None else seed) % len(candidates)
    for net in candidates[start:] + candidates[:start]:
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise StackError(f"no free /24 left in {_SUBNET_BASE}")


def _namespaces() -> list[str]:
    out = _ip("netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _ip("-o", "link", "show")
    return [m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)", out, re.MULTILINE)]


def _netns_pids(name: str) -> list[int]:
    with contextlib.suppress(StackError):
        return [int(p) for p in _ip("netns", "pids", name).split()]
    return []


def _kill_netns_processes(name: str, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, what runs in namespace *name* (our own namespace)."""
    pids = _netns_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not [p for p in _netns_pids(name) if pid_alive(p)], timeout, 0.1):
        for pid in _netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not [p for p in _netns_pids(name) if pid_alive(p)], timeout, 0.1)


def sweep_leftovers() -> list[str]:
    """Delete namespaces and links of earlier runs whose creating process is gone.

    Only names of this module's form (``mmf<pid>...``) with a dead ``<pid>``
    are touched: a parallel run's are left alone.  Returns what was removed.
    """
    removed = []
    for ns in _namespaces():
        m = _NAME.match(ns)
        if m and not pid_alive(int(m.group(1))):
            _kill_netns_processes(ns)
            with contextlib.suppress(StackError):
                _ip("netns", "del", ns)
                removed.append(ns)
    for link in _links():
        m = _NAME.match(link)
        if m and not pid_alive(int(m.group(1))):
            with contextlib.suppress(StackError):
                _ip("link", "del", link)
                removed.append(link)
    return removed


@attrs.frozen
class NetnsHost:
    """One host: its namespace, its address on the bridge and the root end of its veth."""

    name: str
    netns: str
    address: str
    veth: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """*argv* run inside this host's namespace (``ip netns exec`` execs it: same pid)."""
        return [binary("ip"), "netns", "exec", self.netns, *argv]


class BridgeNetwork:
    """A bridge, a /24 on it and one namespace per host; see the module docstring."""

    #: The interface name a host sees.
    HOST_IF = "eth0"

    def __init__(self, hosts: Sequence[str], subnet: ipaddress.IPv4Network | None = None) -> None:
        if not is_root():
            raise StackError("network namespaces need root")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        if len(self.bridge) > 15:
            raise StackError(f"interface name {self.bridge!r} is too long")
        self.subnet = subnet or free_subnet()
        first = self.subnet.network_address
        #: The bridge's own address, where root-namespace services listen.
        self.gateway = str(first + 1)
        self.hosts = {
            name: NetnsHost(name, f"{self.tag}-h{i}", str(first + 10 + i), f"{self.tag}h{i}")
            for i, name in enumerate(hosts, 1)
        }
        self.created = False

    def __getitem__(self, name: str) -> NetnsHost:
        return self.hosts[name]

    # -- lifecycle -----------------------------------------------------------------------

    def create(self) -> BridgeNetwork:
        """Build the bridge and every namespace; on any failure, undo what was built."""
        _LIVE.add(self)
        self.created = True
        try:
            sweep_leftovers()
            prefix = self.subnet.prefixlen
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for host in self.hosts.values():
                _ip("netns", "add", host.netns)
                _ip("link", "add", host.veth, "type", "veth", "peer", "name", self.HOST_IF,
                    "netns", host.netns)
                _ip("link", "set", host.veth, "master", self.bridge, "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{prefix}", "dev",
                    self.HOST_IF)
                _ip("-n", host.netns, "link", "set", self.HOST_IF, "up")
                # Deliberately no route beyond the subnet: nothing leaves the bridge.
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill what runs in the namespaces, delete them (and their veths) and the bridge."""
        if not self.created:
            return
        for host in self.hosts.values():
            if host.netns in _namespaces():
                _kill_netns_processes(host.netns)
                _ip("netns", "del", host.netns)
        # Deleting a namespace takes its veth along, a moment later.
        wait_until(lambda: not {h.veth for h in self.hosts.values()} & set(_links()), 5.0, 0.05)
        for name in [h.veth for h in self.hosts.values()] + [self.bridge]:
            if name in _links():
                _ip("link", "del", name)
        self.created = False
        _LIVE.discard(self)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist (empty after destroy)."""
        names = {self.bridge} | {h.netns for h in self.hosts.values()} | {
            h.veth for h in self.hosts.values()}
        return sorted(names & (set(_namespaces()) | set(_links())))

    def __enter__(self) -> BridgeNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- faults --------------------------------------------------------------------------

    def link_down(self, name: str) -> None:
        """Cut a host off: its ``eth0`` goes down inside its namespace; no RST leaves it."""
        _ip("-n", self.hosts[name].netns, "link", "set", self.HOST_IF, "down")

    def link_up(self, name: str) -> None:
        """Give a cut host its link back (the address stays configured)."""
        host = self.hosts[name]
        _ip("-n", host.netns, "link", "set", self.HOST_IF, "up")
        # The address is usable once duplicate address detection (none for
        # IPv4) and the bridge port's forwarding state allow it.
        wait_until(lambda: "UP" in _ip("-n", host.netns, "-br", "link", "show",
                                       self.HOST_IF), 5.0, 0.05)

    def routes(self, name: str) -> str:
        """The host's routing table, for the "no default route" check."""
        return _ip("-n", self.hosts[name].netns, "-4", "route", "show")

    def spawn(self, name: str, argv: Sequence[str], output: Path,
              cwd: Path | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start *argv* inside host *name*'s namespace, in its own session, output to a file."""
        with output.open("ab") as out:
            return subprocess.Popen(
                self.hosts[name].command(argv), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=cwd, env=env, close_fds=True,
                start_new_session=True)


def wait_gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for *proc* to exit; True when it did."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return True
        time.sleep(0.05)
    return proc.poll() is not None
