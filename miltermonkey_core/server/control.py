"""The control channel between the supervisor and its worker: length-prefixed JSON frames.

The configuration travels to the worker pickled inside a frame: the worker
trusts its parent.  Nothing the worker sends back is ever unpickled, because
the worker runs with fewer privileges than the supervisor (``user``/``group``).
"""

from __future__ import annotations

import base64
import json
import pickle
import socket
import struct
from typing import Any

_FRAME = struct.Struct("!I")
_MAX_FRAME = 64 * 1024 * 1024


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None at end of stream."""
    head = _recv_exact(sock, _FRAME.size)
    if head is None:
        return None
    (n,) = _FRAME.unpack(head)
    if n > _MAX_FRAME:
        raise OSError(f"control frame of {n} bytes is too large")
    data = _recv_exact(sock, n)
    if data is None:
        return None
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise OSError("control frame is not a JSON object")
    return obj


def pack_config(config: Any) -> str:
    return base64.b64encode(pickle.dumps(config)).decode("ascii")


def unpack_config(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))  # noqa: S301 - only ever from our parent
