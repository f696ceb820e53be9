"""One HTTP attempt of a webhook delivery: headers, signing, safety checks, capped reads.

``Transport.send`` builds the request (configured headers, JSON content type, the
Standard Webhooks id/timestamp/signature of this attempt), optionally refuses destinations
that resolve to non-public addresses (and then connects to the address it checked, so a
second DNS answer cannot swap it), bounds the whole attempt by the hook's timeout and reads
at most ``max_response_bytes`` of the answer. Retrying is the caller's business. Relies
on httpx and anyio; never logs headers or bodies, and a filter on the ``httpx`` logger
masks user info, query values and token-like path segments in the request URLs httpx
itself logs at INFO.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx

from asyncstore.orchestrator.errors import DeliveryFailed, DestinationRefused
from asyncstore.orchestrator.webhooks.breaker import Breakers
from asyncstore.orchestrator.webhooks.masking import mask_url
from asyncstore.orchestrator.webhooks.signing import signature_headers

__all__ = ["DeliveryFailed", "Reply", "Transport", "parse_retry_after"]

_USER_AGENT = "asyncstore-webhooks/1"


@dataclass(frozen=True, slots=True)
class Reply:
    """What the receiver answered (the body is cut at the transport's cap)."""

    status: int
    body: bytes
    truncated: bool
    retry_after_s: float | None  # parsed and clamped Retry-After, if any


def parse_retry_after(value: str | None, ceiling_s: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), within [0, ceiling]."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), ceiling_s)


class _MaskUrls(logging.Filter):
    """Masks the secrets of URLs (user info, query, token-like path segments) in httpx's
    "HTTP Request: ..." records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(_mask(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


def _mask(url: httpx.URL) -> str:
    return mask_url(str(url))


_URL_FILTER = _MaskUrls()


def _refused(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Not global covers private, loopback, link-local, CGNAT, documentation, unspecified.
    return not ip.is_global or ip.is_multicast


class Transport:
    """Sends single attempts through a shared ``httpx.AsyncClient``."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        refuse_private: bool = False,
        max_response_bytes: int = 65_536,
        retry_after_max_s: float = 60.0,
        breakers: Breakers | None = None,
    ) -> None:
        self.client = client
        self.breakers = breakers if breakers is not None else Breakers()
        httpx_log = logging.getLogger("httpx")
        if _URL_FILTER not in httpx_log.filters:
            httpx_log.addFilter(_URL_FILTER)
        self.refuse_private = refuse_private
        self.max_response_bytes = max_response_bytes
        self.retry_after_max_s = retry_after_max_s
        self.requests = 0  # HTTP requests actually sent

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        *,
        msg_id: str,
        headers: dict[str, str],
        keys: tuple[bytes, ...],
        timeout_s: float,
    ) -> Reply:
        """One attempt; ``DeliveryFailed`` if no answer came within ``timeout_s``.

        A refused destination raises ``DeliveryFailed`` (not retryable); so does an open
        circuit (retryable, with ``retry_in_s``), without sending anything. If cancelled,
        the request is abandoned and its connection closed.
        """
        breaker = self.breakers.for_url(url)
        if not breaker.allow():
            wait = breaker.retry_in_s()
            raise DeliveryFailed(
                f"circuit open: the receiver failed repeatedly; next probe in {wait:.1f} s",
                retry_in_s=wait,
            )
        up: bool | None = None
        try:
            reply = await self._attempt(method, url, body, msg_id, headers, keys, timeout_s)
        except DeliveryFailed as exc:
            up = None if not exc.retryable else False  # a refused destination says nothing
            raise
        else:
            up = reply.status < 500  # any answer below 500 shows a live receiver
            return reply
        finally:
            breaker.record(up)

    async def _attempt(
        self,
        method: str,
        url: str,
        body: bytes,
        msg_id: str,
        headers: dict[str, str],
        keys: tuple[bytes, ...],
        timeout_s: float,
    ) -> Reply:
        request_headers = {
            "content-type": "application/json",
            "user-agent": _USER_AGENT,
            **headers,
            **signature_headers(msg_id, body, keys),
        }
        extensions: dict[str, object] = {}
        try:
            with anyio.fail_after(timeout_s):
                if self.refuse_private:
                    url, request_headers["host"], hostname = await self._pin(url)
                    extensions["sni_hostname"] = hostname  # TLS checks the name, not the IP
                request = self.client.build_request(
                    method,
                    url,
                    content=body,
                    headers=request_headers,
                    timeout=timeout_s,
                    extensions=extensions,
                )
                self.requests += 1
                response = await self.client.send(request, stream=True)
                try:
                    data, truncated = await self._read(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {timeout_s:g} s") from None
        except DestinationRefused as exc:
            raise DeliveryFailed(str(exc), retryable=False) from None
        except httpx.HTTPError as exc:
            # The class name only: httpx messages may quote the URL, which can hold a token.
            raise DeliveryFailed(f"{type(exc).__name__}") from None
        retry_after = None
        if response.status_code in (429, 503):
            retry_after = parse_retry_after(
                response.headers.get("retry-after"), self.retry_after_max_s
            )
        return Reply(response.status_code, data, truncated, retry_after)

    async def _read(self, response: httpx.Response) -> tuple[bytes, bool]:
        cap = self.max_response_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                return b"".join(chunks)[:cap], True
        return b"".join(chunks), False

    async def _pin(self, url: str) -> tuple[str, str, str]:
        """Resolve the host, refuse non-public addresses, return the URL on the IP and Host."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DeliveryFailed(f"cannot resolve the destination host ({exc.strerror})") from None
        addresses = [str(info[4][0]) for info in infos]
        if not addresses or any(_refused(a) for a in addresses):
            raise DestinationRefused(
                "the destination resolves to a private, loopback or link-local address"
            )
        address = addresses[0]
        literal = f"[{address}]" if ":" in address else address
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        host_header = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc)), host_header, host
