"""Cluster signatures: how one appliance proves to another that a request comes from a cluster member.

The forwarding node signs, with the shared secret (HMAC-SHA256), the method, path, a timestamp,
a one-time nonce, its own node name, the caller it acts for (tenant, key id, role) and the SHA-256
of the request body. The receiving node recomputes the signature in constant time, refuses
timestamps outside `max_age_s` and nonces it has already seen within that window, checks the body
against its signed digest as it is read (the gateway middleware), and then serves the request as
that caller. Traffic is still plain HTTP (readable on the path): run the cluster on a private
network or behind TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Mapping

from appliance.errors import AuthenticationFailed
from appliance.types import Principal

VERSION = "v2"
H_NODE = "x-appliance-node"
H_TIMESTAMP = "x-appliance-timestamp"
H_NONCE = "x-appliance-nonce"
H_TENANT = "x-appliance-tenant"
H_KEY_ID = "x-appliance-key-id"
H_ROLE = "x-appliance-role"
H_SIGNATURE = "x-appliance-signature"
H_BODY = "x-appliance-body-sha256"
"""The signed digest of the request body; the gateway middleware checks the body against it."""
CLUSTER_HEADERS = (H_NODE, H_TIMESTAMP, H_NONCE, H_TENANT, H_KEY_ID, H_ROLE, H_BODY, H_SIGNATURE)

PROBE_PRINCIPAL_TENANT = "default"
"""Probes act for no caller; they name the default tenant so the signed fields are never empty."""


def _message(
    method: str, path: str, ts: str, nonce: str, node: str, tenant: str, key_id: str, role: str, body: str
) -> bytes:
    # One field per line; none of them may contain a newline (checked on both sides).
    return "\n".join((VERSION, method.upper(), path, ts, nonce, node, tenant, key_id, role, body)).encode()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _mac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(
    secret: str,
    *,
    node: str,
    method: str,
    path: str,
    principal: Principal,
    body: bytes = b"",
    now: float | None = None,
) -> dict[str, str]:
    """The headers that let `node` send `body` to `method path` on a peer on behalf of `principal`."""
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    digest = body_digest(body)
    fields = {
        H_NODE: node, H_TIMESTAMP: ts, H_NONCE: nonce,
        H_TENANT: principal.tenant, H_KEY_ID: principal.key_id or "", H_ROLE: principal.role, H_BODY: digest,
    }
    if any("\n" in v or "\r" in v for v in fields.values()):
        raise ValueError("a signed cluster field contains a line break")
    message = _message(
        method, path, ts, nonce, node, principal.tenant, principal.key_id or "", principal.role, digest
    )
    return {**fields, H_SIGNATURE: _mac(secret, message)}


class SignatureVerifier:
    """Checks cluster signatures; an instance is the gateway middleware's `peer_auth`.

    `secret_for(node)` gives the key a node must have signed with (its per-peer key, else the
    cluster secret), or None when that node may not call in at all. `paths` are the only routes
    a signature opens: the forwarded inference routes and the state route, never the admin API.
    """

    def __init__(
        self,
        secret_for: Callable[[str], str | None],
        *,
        paths: frozenset[str],
        max_age_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret_for = secret_for
        self._paths = paths
        self._max_age = max_age_s
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, headers: Mapping[str, str], method: str, path: str) -> Principal | None:
        if not any(name in headers for name in CLUSTER_HEADERS):
            return None
        return self.verify(headers, method, path)

    def verify(self, headers: Mapping[str, str], method: str, path: str) -> Principal:
        """The caller the signature vouches for; AuthenticationFailed for anything wrong."""
        if path not in self._paths:
            raise AuthenticationFailed(f"Cluster signatures are not accepted on {path}.")
        try:
            node, ts, nonce = headers[H_NODE], headers[H_TIMESTAMP], headers[H_NONCE]
            tenant, key_id, role, given = headers[H_TENANT], headers[H_KEY_ID], headers[H_ROLE], headers[H_SIGNATURE]
            digest = headers[H_BODY]
        except KeyError as exc:
            raise AuthenticationFailed(f"Incomplete cluster signature: {exc.args[0]} is missing.") from None
        secret = self._secret_for(node)
        if secret is None:
            raise AuthenticationFailed("Unknown cluster node or federation is off on this node.")
        expected = _mac(secret, _message(method, path, ts, nonce, node, tenant, key_id, role, digest))
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise AuthenticationFailed("Invalid cluster signature (is the cluster secret the same on both nodes?).")
        try:
            age = self._clock() - float(ts)
        except ValueError:
            raise AuthenticationFailed("Invalid cluster timestamp.") from None
        if abs(age) > self._max_age:
            raise AuthenticationFailed(
                f"Cluster signature timestamp is {age:.0f} s off (at most {self._max_age:.0f} s): check the clocks."
            )
        self._remember(nonce)
        if role not in ("admin", "user"):
            raise AuthenticationFailed("Invalid role in the cluster signature.")
        return Principal(tenant=tenant, key_id=key_id or None, role=role, forwarded_by=node)  # type: ignore[arg-type]

    def _remember(self, nonce: str) -> None:
        """Refuse a nonce seen before: a captured request cannot be replayed within the time window."""
        now = self._clock()
        with self._lock:
            if len(self._seen) > 1024:
                self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * self._max_age}
            if nonce in self._seen:
                raise AuthenticationFailed("Replayed cluster signature.")
            self._seen[nonce] = now
