"""Connection limits for ``chatlm serve``: what uvicorn leaves open against slow or numerous clients.

uvicorn's h11 protocol waits forever for a request's headers, so clients that send them a byte at a time (or
never finish them) each hold a socket and a file descriptor until the process runs out and every legitimate
request fails. `guarded_protocol` makes uvicorn's own protocol class (a subclass of it) that
- closes a connection whose request headers are not complete within ``header_timeout`` seconds of its first
  byte (or of the connection, for the first request) with a 408;
- answers 503 and closes at once when more than ``max_connections`` are open, well below the descriptor limit,
  so the server itself never fails to accept.
Idle keep-alive connections are closed by uvicorn's ``timeout_keep_alive``; a body that comes too slowly is the
app's to time out (`Server.body`).
"""

from __future__ import annotations

import asyncio
import json
import resource

from uvicorn.protocols.http.h11_impl import H11Protocol

RESERVED_DESCRIPTORS = 256  # for the model's files, the kernels, logs: never taken by connections


def raise_descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit (as servers do at start); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int | None) -> int:
    """``wanted`` (or a default of 4,096), kept below the descriptor limit less `RESERVED_DESCRIPTORS`."""
    room = raise_descriptor_limit() - RESERVED_DESCRIPTORS
    if room < 16:
        raise ValueError(f"this process may open too few files to serve ({room + RESERVED_DESCRIPTORS})")
    return min(wanted or 4096, room)


def _response(status: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on request headers and a cap on open connections."""

    class GuardedProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(
                    _response("503 Service Unavailable", "the server has too many connections open")
                )
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if (
                self.cycle is None or self.cycle.response_complete
            ):  # between requests: a new one's headers begin
                self._arm()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # its headers are in: no deadline
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.cycle is None or self.cycle.response_complete:
                message = f"the request's headers did not arrive within {header_timeout:g} s"
                self.transport.write(_response("408 Request Timeout", message))
                self.transport.close()

    return GuardedProtocol
