"""Who is calling: API keys (tenants), per-job watch tokens, single-use stream tickets.

* ``API_KEYS=acme:k1,acme:k2,globex:k3``: ``Authorization: Bearer k1`` acts as tenant ``acme``.
  With no keys the server runs in keyless dev mode: every caller is the tenant ``""``.
* A watch token is returned with each submitted job: ``v1.<job id>.<tenant>.<expiry>.<mac>``,
  HMAC-signed, valid until the job's document could have expired. It lets a browser read that
  one job (status, SSE, WebSocket) without holding the API key.
* A stream ticket (``POST /tickets``) is random, lives 60 s and works once: for URLs that would
  otherwise carry the longer-lived token (``EventSource`` cannot send headers).

A caller only ever sees its own tenant's jobs; a foreign or unknown job is the same 404.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from core import contract
from server.problems import Problem
from core.settings import Settings

TICKET_TTL = 60
TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Caller:
    tenant: str
    ident: str  # who, for rate limits and connection caps: a key's hash, or the client's IP
    by_key: bool = False  # an API key (or keyless dev mode): the whole tenant
    jobs: frozenset[str] | None = None  # a token or ticket: only these jobs (None: all)
    all_jobs: bool = False  # a ticket for the tenant's whole feed

    def may_read(self, job_id: str, tenant: str) -> bool:
        return tenant == self.tenant and (self.jobs is None or job_id in self.jobs)


def unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def forbidden_key() -> Problem:
    return Problem(401, "API key required", "This call needs an API key (Authorization: Bearer ...).", headers={"WWW-Authenticate": "Bearer"})


class Auth:
    def __init__(self, settings: Settings, secret: bytes, redis: Redis) -> None:
        self.settings = settings
        self.secret = secret
        self.redis = redis
        self.keys: dict[str, str] = parse_keys(settings.api_keys)
        self.idents = {key: "key:" + hashlib.sha256(key.encode()).hexdigest()[:16] for key in self.keys}

    @property
    def keyless(self) -> bool:
        return not self.keys

    # -- watch tokens -------------------------------------------------------------------

    def token(self, job_id: str, tenant: str) -> str:
        expires = int(time.time()) + self.settings.job_ttl + self.settings.result_ttl
        body = f"{job_id}.{tenant}.{expires}"
        return f"v1.{body}.{self._mac(body)}"

    def _mac(self, body: str) -> str:
        digest = hmac.digest(self.secret, body.encode(), "sha256")[:18]
        return base64.urlsafe_b64encode(digest).decode()

    def from_token(self, token: str) -> Caller:
        try:
            version, job_id, tenant, expires, mac = token.split(".")
        except ValueError:
            raise unauthorized("Malformed token.") from None
        body = f"{job_id}.{tenant}.{expires}"
        if version != "v1" or not hmac.compare_digest(mac, self._mac(body)):
            raise unauthorized("Invalid token.")
        if not expires.isdigit() or int(expires) < time.time():
            raise unauthorized("Token expired.")
        return Caller(tenant, "token:" + job_id, jobs=frozenset([job_id]))

    # -- stream tickets -----------------------------------------------------------------

    async def ticket(self, caller: Caller, jobs: list[str] | None) -> str:
        """A single-use ticket for ``jobs`` (or the caller's whole feed when None)."""
        ticket = secrets.token_urlsafe(24)
        grant = {"tenant": caller.tenant, "jobs": jobs, "ident": caller.ident}
        await self.redis.set(contract.ticket_key(ticket), json.dumps(grant), ex=TICKET_TTL)
        return ticket

    async def _from_ticket(self, ticket: str) -> Caller:
        raw = await self.redis.getdel(contract.ticket_key(ticket))
        if raw is None:
            raise unauthorized("Unknown, used or expired ticket.")
        grant = json.loads(raw)
        jobs = grant["jobs"]
        return Caller(grant["tenant"], grant["ident"], jobs=None if jobs is None else frozenset(jobs), all_jobs=jobs is None)

    # -- the caller of a request ---------------------------------------------------------

    async def caller(self, conn: HTTPConnection, key_only: bool = False) -> Caller:
        """The caller: API key first, then (unless ``key_only``) ``?ticket=`` or ``?token=``."""
        header = conn.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        ip = conn.client.host if conn.client else "?"
        if header:
            if scheme.lower() != "bearer" or not credential:
                raise unauthorized("Use Authorization: Bearer <API key or watch token>.")
            tenant = self.keys.get(credential)
            if tenant is not None:
                return Caller(tenant, self.idents[credential], by_key=True)
            if credential.startswith("v1.") and not key_only:
                return self.from_token(credential)
            raise unauthorized("Unknown API key.")
        if not key_only:
            ticket = conn.query_params.get("ticket")
            if ticket:
                return await self._from_ticket(ticket)
            tokens = conn.query_params.getlist("token")
            if len(tokens) == 1:
                return self.from_token(tokens[0])
            if tokens:  # several watch tokens (one per job): the union of their jobs, one tenant
                scopes = [self.from_token(token) for token in tokens]
                if len({scope.tenant for scope in scopes}) != 1:
                    raise unauthorized("Watch tokens of different tenants.")
                jobs = frozenset().union(*(scope.jobs or () for scope in scopes))
                return Caller(scopes[0].tenant, "token:" + min(jobs), jobs=jobs)
        if self.keyless:
            return Caller("", "ip:" + ip, by_key=True)
        raise forbidden_key() if key_only else unauthorized("Send an API key, a watch token or a ticket.")


def parse_keys(spec: str) -> dict[str, str]:
    """``tenant:key,tenant:key`` -> {key: tenant}; refuses malformed entries at start-up."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tenant, sep, key = item.partition(":")
        if not sep or not TENANT_RE.fullmatch(tenant) or len(key) < 8:
            raise SystemExit(f"API_KEYS entry {item.split(':')[0]!r}:... must be tenant:key, key at least 8 characters")
        keys[key] = tenant
    return keys


async def shared_secret(settings: Settings, redis: Redis) -> bytes:
    """TOKEN_SECRET, or a random one kept in Redis so that every replica signs alike."""
    if settings.token_secret:
        return settings.token_secret.encode()
    await redis.set(contract.SECRET_KEY, secrets.token_urlsafe(32), nx=True)
    return await redis.get(contract.SECRET_KEY)
