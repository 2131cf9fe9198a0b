"""The gateway: who is calling, what they may do, and what each request used.

`Gateway.authenticate` turns the Authorization header into a Principal; `Gateway.context` makes each
request's `RequestContext` (policy/request.py: its identity, the policy the services call, and the usage
that becomes its one record).
"""

from __future__ import annotations

import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from appliance.errors import ApplianceError, AuthenticationFailed
from appliance.observability.metrics import Metrics
from appliance.policy.db import open_gateway_db
from appliance.policy.experiments import ExperimentStore
from appliance.policy.limits import BudgetLedger, RateLimits
from appliance.policy.guardrails import Guardrails, InjectionClassifier
from appliance.policy.guardrails.ner import LazyEntityDetector, missing_packages
from appliance.policy.metering import UsageMeter
from appliance.policy.request import RequestContext
from appliance.policy.tenancy import ApiKey, TenantStore
from appliance.storage.sqlite import connect
from appliance.settings import GatewaySettings
from appliance.types import DEFAULT_TENANT, Principal

log = logging.getLogger(__name__)


def loopback_host(host: str) -> bool:
    """True when binding `host` exposes the server to this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Gateway:
    def __init__(
        self, data_dir: Path, settings: GatewaySettings, *, open_mode_allowed: bool, metrics: Metrics | None = None,
        injection_classifier: InjectionClassifier | None = None,
        retrieved_injection_classifier: InjectionClassifier | None = None,
    ) -> None:
        """`injection_classifier` / `retrieved_injection_classifier`: the learned detectors for user input
        and for retrieved content (gateway.injection_classifier, gateway.retrieved_injection_classifier),
        second opinions beside the rules; None, or None from their `scores`, leaves the rules to decide."""
        self._conn = open_gateway_db(data_dir)
        self.settings = settings
        self.tenants = TenantStore(self._conn)
        self.meter = UsageMeter(self._conn, settings.prices)
        self.experiments = ExperimentStore(connect(data_dir / "gateway.db"))
        """Feedback and shadow answers (their own connection: the meter's transactions stay its own)."""
        self.rates = RateLimits(settings)
        self.budgets = BudgetLedger(self.meter)
        self.metrics = metrics or Metrics()
        self.open_mode_allowed = open_mode_allowed
        """Without any API key, serve everyone as the default tenant's admin: only when bound to loopback."""
        self.guardrails = Guardrails(classifier=injection_classifier,
                                     retrieved_classifier=retrieved_injection_classifier,
                                     entities=_entity_detector())
        self.tenants.ensure_tenant(DEFAULT_TENANT)
        self.journal = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-journal")
        """Checkpoints of streaming requests (fsync'd writes): never on the event loop, never waited for."""

    def open_mode(self) -> bool:
        return self.open_mode_allowed and not self.tenants.any_keys()

    def authenticate(self, authorization: str | None) -> tuple[Principal, ApiKey | None]:
        if self.open_mode():
            return Principal(tenant=DEFAULT_TENANT, key_id=None, role="admin"), None
        if not authorization:
            raise AuthenticationFailed("Missing API key: send the header 'Authorization: Bearer <key>'.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("The Authorization header must be 'Bearer <key>'.")
        return self.tenants.authenticate(token.strip())

    def context(self, request_id: str, route: str, method: str) -> RequestContext:
        return RequestContext(self, request_id, route, method)

    def replay_interrupted(self) -> int:
        replayed = self.meter.replay_interrupted()
        if replayed:
            log.warning("metered %d request(s) that a crash interrupted", replayed)
        return replayed

    def close(self) -> None:
        self.journal.shutdown(wait=True)
        self.experiments.close()
        self._conn.close()


def _entity_detector() -> LazyEntityDetector | None:
    """Named-entity PII (spaCy loads at the first screening that needs it, on a worker thread), or None
    with a warning when its packages are missing: then only the pattern kinds are found."""
    missing = missing_packages()
    if missing:
        log.warning("named-entity PII kinds (person, address...) unavailable: package(s) %s not installed",
                    ", ".join(missing))
        return None
    return LazyEntityDetector()


def error_status(exc: BaseException) -> int:
    if isinstance(exc, ApplianceError):
        return exc.status
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else 500
