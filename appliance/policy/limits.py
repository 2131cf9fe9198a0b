"""Rate limits (the `limits` library's moving windows) and token budgets with reservations.

Rates: requests per minute and tokens per minute, per key and per tenant. A generation is charged
its prompt plus max_tokens when it is admitted (as OpenAI counts it), so a burst of long requests
cannot slip through before the first one finishes.

Budgets: a tenant's tokens per UTC day and month. Admission reserves prompt + max_tokens against
what was already spent plus what other running requests hold; the settle step replaces the
reservation with the real count. Admission runs on the event loop without awaiting between the
check and the reservation, so concurrent requests cannot overspend.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from appliance.errors import BudgetExceeded, RateLimited
from appliance.policy.metering import UsageMeter, period_starts
from appliance.policy.tenancy import ApiKey, Tenant
from appliance.settings import GatewaySettings


class RateLimits:
    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._items: dict[int, RateLimitItem] = {}

    def _item(self, per_minute: int) -> RateLimitItem:
        item = self._items.get(per_minute)
        if item is None:
            item = self._items[per_minute] = RateLimitItemPerMinute(per_minute)
        return item

    def _limits(self, tenant: Tenant, key: ApiKey | None) -> list[tuple[str, str, int, int]]:
        """(scope, identity, rpm, tpm) for the key and the tenant; 0 means unlimited."""
        s = self._settings
        out = [("tenant", tenant.name, _pick(tenant.rpm, s.tenant_rpm), _pick(tenant.tpm, s.tenant_tpm))]
        if key is not None:
            out.append(("key", key.id, _pick(key.rpm, s.key_rpm), _pick(key.tpm, s.key_tpm)))
        return out

    def admit_request(self, tenant: Tenant, key: ApiKey | None) -> None:
        """Count one request against requests-per-minute, or raise 429 without counting it."""
        self._admit("rpm", [(scope, ident, rpm) for scope, ident, rpm, _ in self._limits(tenant, key)], 1)

    def admit_tokens(self, tenant: Tenant, key: ApiKey | None, tokens: int) -> None:
        """Charge `tokens` against tokens-per-minute, or raise 429 without charging anything."""
        if tokens > 0:
            self._admit("tpm", [(scope, ident, tpm) for scope, ident, _, tpm in self._limits(tenant, key)], tokens)

    def _admit(self, kind: str, limits: list[tuple[str, str, int]], cost: int) -> None:
        unit = "requests" if kind == "rpm" else "tokens"
        for scope, ident, per_minute in limits:
            if not per_minute:
                continue
            if cost > per_minute:
                raise RateLimited(
                    f"This request needs {cost} tokens but {scope} {ident} may use {per_minute} per minute;"
                    " lower max_tokens or the input.",
                    code="tokens_exceed_limit",
                )
            if not self._limiter.test(self._item(per_minute), kind, scope, ident, cost=cost):
                raise RateLimited(
                    f"Rate limit reached for {scope} {ident}: {per_minute} {unit} per minute.",
                    retry_after=self._retry_after(per_minute, kind, scope, ident),
                )
        for scope, ident, per_minute in limits:
            if per_minute:
                self._limiter.hit(self._item(per_minute), kind, scope, ident, cost=cost)

    def _retry_after(self, per_minute: int, *ids: str) -> int:
        reset = self._limiter.get_window_stats(self._item(per_minute), *ids).reset_time
        return max(1, math.ceil(reset - time.time()))


def _pick(own: int | None, default: int) -> int:
    return default if own is None else own


@dataclass
class Reservation:
    tenant: str
    tokens: int
    settled: bool = False


@dataclass
class _Spent:
    day_start: float = 0.0
    month_start: float = 0.0
    day: int = 0
    month: int = 0
    reserved: int = 0
    loaded: bool = False


class BudgetLedger:
    def __init__(self, meter: UsageMeter) -> None:
        self._meter = meter
        self._tenants: dict[str, _Spent] = {}
        # Reservations and settlements run on worker threads (off the event loop): checking a budget and
        # reserving from it is one step, or two requests could both pass the check and overspend it.
        self._lock = threading.Lock()

    def _spent(self, tenant: str) -> _Spent:
        day_start, month_start = period_starts()
        spent = self._tenants.setdefault(tenant, _Spent())
        if not spent.loaded or spent.day_start != day_start or spent.month_start != month_start:
            spent.day_start, spent.month_start = day_start, month_start
            spent.day = self._meter.tokens_since(tenant, day_start)
            spent.month = self._meter.tokens_since(tenant, month_start)
            spent.loaded = True
        return spent

    def reserve(self, tenant: Tenant, tokens: int) -> Reservation | None:
        if tenant.daily_tokens is None and tenant.monthly_tokens is None:
            return None
        with self._lock:
            return self._reserve(tenant, tokens)

    def _reserve(self, tenant: Tenant, tokens: int) -> Reservation:
        spent = self._spent(tenant.name)
        for period, budget, used in (
            ("daily", tenant.daily_tokens, spent.day),
            ("monthly", tenant.monthly_tokens, spent.month),
        ):
            if budget is not None and used + spent.reserved + tokens > budget:
                left = max(0, budget - used - spent.reserved)
                raise BudgetExceeded(
                    f"The {period} token budget of tenant {tenant.name} ({budget}) cannot cover this request"
                    f" ({tokens} tokens reserved for prompt + max_tokens; {left} left).",
                    retry_after=_seconds_to_next(period),
                )
        spent.reserved += tokens
        return Reservation(tenant.name, tokens)

    def settle(self, reservation: Reservation | None, tokens_used: int) -> None:
        if reservation is None:
            return
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            spent = self._tenants.get(reservation.tenant)
            if spent is None:
                return
            spent.reserved -= reservation.tokens
            spent.day += tokens_used
            spent.month += tokens_used

    def remaining(self, tenant: Tenant) -> dict[str, int | None]:
        with self._lock:
            spent = self._spent(tenant.name)
        return {
            "daily": None if tenant.daily_tokens is None else tenant.daily_tokens - spent.day - spent.reserved,
            "monthly": None if tenant.monthly_tokens is None else tenant.monthly_tokens - spent.month - spent.reserved,
        }


def _seconds_to_next(period: str) -> int:
    now = time.time()
    day_start, month_start = period_starts(now)
    if period == "daily":
        return max(1, int(day_start + 86400 - now))
    # Next month's first day: 32 days after this month's start always lands in the next month.
    nxt_day, nxt_month = period_starts(month_start + 32 * 86400)
    return max(1, int(nxt_month - now))

