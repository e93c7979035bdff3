"""Webhooks: Standard Webhooks signatures, ``verify`` for receivers, and the SSRF guard.

A job submitted with ``"webhook": "https://..."`` gets its final document POSTed there by a
worker (``worker/webhooks.py``), signed as in the Standard Webhooks spec:

* ``webhook-id``: ``contract.webhook_delivery_id(job_id, seq)``, the same on every retry (the
  receiver's idempotency key);
* ``webhook-timestamp``: unix seconds of this attempt;
* ``webhook-signature``: ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), where
  the key is the base64 part of ``WEBHOOK_SECRET=whsec_<base64>``.

The SSRF guard (``resolve``) runs twice: at submit (``check_submitted``, a 422 naming
``webhook``) and at send time, where the worker connects to the very address that was checked.
A URL is refused unless it is http(s) without credentials and every address its host resolves
to is public, or is allowed by ``WEBHOOK_ALLOWED_HOSTS`` (hostnames or CIDRs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from core.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT = 5.0  # seconds for getaddrinfo, at submit and at send time
PATH_SAFE = "!$%&'()*+,/:;=?@~[]"
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NOT_PUBLIC = "must resolve only to public addresses (loopback, private, link-local and other internal ones are refused)"


# -- signatures ----------------------------------------------------------------------------


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional); ValueError if malformed."""
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("WEBHOOK_SECRET must be whsec_ followed by base64") from None
    if not key:
        raise ValueError("WEBHOOK_SECRET is empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, tolerance: int = 300) -> Any:
    """Check a Standard Webhooks delivery; return the parsed JSON body or raise ValueError.

    Self-contained (stdlib only) so a receiver can copy it. ``headers`` is any mapping with
    ``.items()`` (names in any case); ``body`` is the raw request body, before any JSON parsing.
    A timestamp more than ``tolerance`` seconds off the receiver's clock is refused, so a
    captured delivery cannot be replayed later; dedupe on ``webhook-id`` within that window.
    """
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, timestamp, signatures = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        raise ValueError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(timestamp)
    except ValueError:
        raise ValueError("webhook-timestamp is not an integer") from None
    if abs(time.time() - ts) > tolerance:
        raise ValueError("webhook-timestamp is too old or too new")
    raw = secret.removeprefix("whsec_")
    key = base64.b64decode(raw + "=" * (-len(raw) % 4))
    data = body.encode() if isinstance(body, str) else body
    expected = hmac.new(key, f"{msg_id}.{ts}.".encode() + data, hashlib.sha256).digest()
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        try:
            given = base64.b64decode(value, validate=True)
        except ValueError:
            continue
        if version == "v1" and hmac.compare_digest(given, expected):
            return json.loads(data)
    raise ValueError("no valid signature")


# -- the SSRF guard ------------------------------------------------------------------------


class Refused(Exception):
    """The URL may not be called. ``transient``: a DNS failure, worth trying again later."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: where to connect (``addresses``) and what to say (``host_header``)."""

    scheme: str
    host: str  # the URL's host, ASCII (IDNA), no brackets
    port: int
    path: str  # path and query, as given
    host_header: str
    addresses: tuple[str, ...]  # every resolved address, all checked; connect only to these


def blocked(ip: Address) -> str | None:
    """Why ``ip`` is not a public address (None if it is). Embedded IPv4 addresses count too."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip in NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        for inner in embedded:
            if inner is not None and (reason := blocked(inner)):
                return reason
    for reason, hit in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("not globally routable", not ip.is_global),
    ):
        if hit:
            return reason
    return None


@functools.lru_cache(maxsize=8)
def allowlist(spec: str) -> tuple[frozenset[str], tuple[Network, ...]]:
    """``WEBHOOK_ALLOWED_HOSTS``: comma-separated hostnames and CIDRs (a bare IP is a /32 or /128)."""
    names, networks = set(), []
    for entry in (item.strip() for item in spec.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return frozenset(names), tuple(networks)


def normalise(ip: Address) -> Address:
    """``::ffff:a.b.c.d`` is the IPv4 address a.b.c.d: check it and connect to it as such."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse(url: object) -> tuple[str, str, int, str, str]:
    """``(scheme, host, port, path, host header)`` of an acceptable URL, else Refused."""
    if not isinstance(url, str) or not url:
        raise Refused("must be an http(s) URL")
    if len(url) > MAX_URL_LENGTH:
        raise Refused(f"must be at most {MAX_URL_LENGTH} characters")
    if any(c <= " " or c == "\x7f" or c == "\\" for c in url):
        raise Refused("must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise Refused("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("must be an http(s) URL")
    if "@" in parts.netloc:
        raise Refused("must not contain credentials (user:password@)")
    if not host:
        raise Refused("must name a host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise Refused("has an invalid host name") from None
    if port == 0:
        raise Refused("has an invalid port")
    port = port or (443 if scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == (443 if scheme == "https" else 80) else f"{shown}:{port}"
    path = quote(parts.path or "/", safe=PATH_SAFE)  # non-ASCII is percent-encoded; escapes stay
    if parts.query:
        path += "?" + quote(parts.query, safe=PATH_SAFE)
    return scheme, host, port, path, host_header


async def resolve(url: object, settings: Settings) -> Target:
    """Parse ``url``, resolve its host once and check every address; Refused if any is not allowed."""
    scheme, host, port, path, host_header = parse(url)
    names, networks = allowlist(settings.webhook_allowed_hosts)
    named = host.lower().rstrip(".") in names
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, TimeoutError):
        raise Refused("host does not resolve", transient=True) from None
    addresses: list[str] = []
    for *_, sockaddr in infos:
        try:
            ip = normalise(ipaddress.ip_address(str(sockaddr[0]).partition("%")[0]))
        except ValueError:
            raise Refused("host resolves to an unusable address") from None
        if not named and not any(ip in net for net in networks) and blocked(ip):
            raise Refused(NOT_PUBLIC)
        if str(ip) not in addresses:
            addresses.append(str(ip))
    if not addresses:
        raise Refused("host does not resolve", transient=True)
    return Target(scheme, host, port, path, host_header, tuple(addresses))


async def check_submitted(url: object, settings: Settings) -> str | None:
    """Why ``url`` cannot be a job's webhook (the 422 message for field ``webhook``), or None."""
    if not settings.webhook_secret:
        return "webhooks are not enabled on this server (set WEBHOOK_SECRET)"
    try:
        secret_key(settings.webhook_secret)
    except ValueError as e:
        return f"webhooks are misconfigured on this server: {e}"
    try:
        await resolve(url, settings)
    except Refused as e:
        return str(e)
    return None

