"""Tenants and API keys. Keys are random, shown once, stored only as a SHA-256 hash under a visible id.

A key reads `ak_<id>.<secret>`: `ak_<id>` (8 hex digits) identifies it in lists, logs and usage;
the secret is 32 random bytes. SHA-256 without salt is enough for 256-bit random secrets (nothing
to brute-force); the hash is compared in constant time. Every request reads the key row again, so
a revocation or an expiry takes effect on the next request, from the API or from the CLI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from typing import Annotated, Any

import msgspec

from appliance.errors import AuthenticationFailed, InvalidRequest, KeyNotFound, TenantExists, TenantNotFound
from appliance.policy.guardrails.policy import GuardrailPolicy
from appliance.types import Principal, Role

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ADAPTER_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_KEY = re.compile(r"^(ak_[0-9a-f]{8})\.([A-Za-z0-9_-]{43})$")


class Tenant(msgspec.Struct, kw_only=True):
    name: str
    created_at: float
    allowed_models: list[str] | None = None
    """Model ids this tenant may use; None: every model."""
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    guardrails: dict[str, Any] | None = None
    """The tenant's guardrail policy fields; None: the default policy."""
    default_adapter: str | None = None
    """A LoRA adapter id: requests to its base model that name no adapter decode with it."""


class ApiKey(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    role: Role
    name: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    rpm: int | None = None
    tpm: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > time.time())


class TenantUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields an admin may change on a tenant; absent fields stay as they are, null clears a limit."""

    allowed_models: list[str] | None | msgspec.UnsetType = msgspec.UNSET
    rpm: int | None | msgspec.UnsetType = msgspec.UNSET
    tpm: int | None | msgspec.UnsetType = msgspec.UNSET
    daily_tokens: int | None | msgspec.UnsetType = msgspec.UNSET
    monthly_tokens: int | None | msgspec.UnsetType = msgspec.UNSET
    guardrails: dict[str, Any] | None | msgspec.UnsetType = msgspec.UNSET
    default_adapter: Annotated[str, msgspec.Meta(pattern=ADAPTER_ID)] | None | msgspec.UnsetType = msgspec.UNSET


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not _TENANT.match(name):
        raise InvalidRequest(
            "Tenant names use letters, digits, '_' and '-' (at most 64, starting with a letter or digit).",
            param="name",
        )
    return name


def policy_of(fields: dict[str, Any] | None) -> GuardrailPolicy:
    """A tenant's stored guardrail fields as a validated policy (400 naming the bad field otherwise)."""
    try:
        return msgspec.convert(fields or {}, GuardrailPolicy)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid guardrail policy: {exc}", param="guardrails") from None


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


_JSON_FIELDS = ("allowed_models", "guardrails")
_TENANT_FIELDS = ("allowed_models", "rpm", "tpm", "daily_tokens", "monthly_tokens", "guardrails", "default_adapter")


def _tenant(row: sqlite3.Row) -> Tenant:
    data = dict(row)
    for field in _JSON_FIELDS:
        if data[field] is not None:
            data[field] = json.loads(data[field])
    return msgspec.convert(data, Tenant)


def _key(row: sqlite3.Row) -> ApiKey:
    data = dict(row)
    data.pop("secret_sha256", None)
    return msgspec.convert(data, ApiKey)


class TenantStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    # -- tenants -------------------------------------------------------------------------------

    def create_tenant(self, name: str, **fields: Any) -> Tenant:
        check_tenant_name(name)
        update = msgspec.convert(fields, TenantUpdate)
        with self._lock:
            try:
                self._conn.execute("INSERT INTO tenants(name, created_at) VALUES (?, ?)", (name, time.time()))
            except sqlite3.IntegrityError:
                raise TenantExists(f"The tenant '{name}' already exists.", param="name") from None
        return self.update_tenant(name, update)

    def ensure_tenant(self, name: str) -> Tenant:
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO tenants(name, created_at) VALUES (?, ?)", (name, time.time()))
        return self.tenant(name)

    def update_tenant(self, name: str, update: TenantUpdate) -> Tenant:
        self.tenant(name)
        for field in _TENANT_FIELDS:
            value = getattr(update, field)
            if value is msgspec.UNSET:
                continue
            if isinstance(value, int) and value < 0:
                raise InvalidRequest(f"{field} must not be negative.", param=field)
            if field == "guardrails" and value is not None:
                policy_of(value)  # only a valid policy is stored
            if field in _JSON_FIELDS and value is not None:
                value = json.dumps(value)
            with self._lock:
                self._conn.execute(f"UPDATE tenants SET {field} = ? WHERE name = ?", (value, name))
        return self.tenant(name)

    def tenant(self, name: str) -> Tenant:
        row = self._conn.execute("SELECT * FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise TenantNotFound(f"The tenant '{name}' does not exist.", param="tenant")
        return _tenant(row)

    def tenants(self) -> list[Tenant]:
        return [_tenant(r) for r in self._conn.execute("SELECT * FROM tenants ORDER BY name")]

    # -- keys ----------------------------------------------------------------------------------

    def create_key(
        self,
        tenant: str,
        *,
        role: Role = "user",
        name: str | None = None,
        expires_at: float | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for the tenant. Returns the record and the full key, which is never stored."""
        self.tenant(tenant)
        if role not in ("admin", "user"):
            raise InvalidRequest("role must be 'admin' or 'user'.", param="role")
        if expires_at is not None and expires_at <= time.time():
            raise InvalidRequest("expires_at must be in the future.", param="expires_at")
        for field, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 0:
                raise InvalidRequest(f"{field} must not be negative.", param=field)
        secret = secrets.token_urlsafe(32)
        with self._lock:
            while True:
                key_id = "ak_" + secrets.token_hex(4)
                try:
                    self._conn.execute(
                        "INSERT INTO api_keys(id, tenant, role, secret_sha256, name, created_at, expires_at, rpm, tpm)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (key_id, tenant, role, _hash(secret), name, time.time(), expires_at, rpm, tpm),
                    )
                    break
                except sqlite3.IntegrityError:  # an id collision: draw another
                    continue
        return self.key(key_id), f"{key_id}.{secret}"

    def key(self, key_id: str) -> ApiKey:
        row = self._conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFound(f"The key '{key_id}' does not exist.", param="key_id")
        return _key(row)

    def keys(self, tenant: str | None = None) -> list[ApiKey]:
        if tenant is None:
            rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created_at")
        else:
            rows = self._conn.execute("SELECT * FROM api_keys WHERE tenant = ? ORDER BY created_at", (tenant,))
        return [_key(r) for r in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        self.key(key_id)
        with self._lock:
            self._conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
        return self.key(key_id)

    def any_keys(self) -> bool:
        """True once any key was ever created: from then on every request needs a valid one."""
        return self._conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def authenticate(self, presented: str) -> tuple[Principal, ApiKey]:
        match = _KEY.match(presented)
        row = self._conn.execute("SELECT * FROM api_keys WHERE id = ?", (match.group(1),)).fetchone() if match else None
        # Compare even when the id is unknown, so timing does not tell which ids exist.
        expected = row["secret_sha256"] if row is not None else b"\0" * 32
        ok = hmac.compare_digest(_hash(match.group(2) if match else presented), expected)
        if row is None or not ok:
            raise AuthenticationFailed("Incorrect API key provided.")
        key = _key(row)
        if key.revoked_at is not None:
            raise AuthenticationFailed(f"The API key {key.id} has been revoked.")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise AuthenticationFailed(f"The API key {key.id} has expired.")
        return Principal(tenant=key.tenant, key_id=key.id, role=key.role), key
