"""Admin routes (tenants, keys; guarded on the controller), usage reports and /metrics. Thin: call the gateway."""

from __future__ import annotations

import time

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post

from appliance.api.http import json_response, requires_admin
from appliance.engines.registry import ModelRegistry
from appliance.api.openapi import KeyInfo, NewKey, ObjectList, TenantInfo, UsageQuery, UsageReport
from appliance.errors import InvalidRequest, PermissionDenied
from appliance.observability.metrics import CONTENT_TYPE
from appliance.policy.gateway import Gateway, RequestContext
from appliance.policy.metering import VerifyResult, parse_time
from appliance.policy.tenancy import ApiKey, Tenant, TenantUpdate
from appliance.protocol.admin import CreateKey, CreateTenant
from appliance.protocol.openai import decode_request


def _key_out(key: ApiKey) -> dict[str, object]:
    return {**msgspec.to_builtins(key), "active": key.active}


class AdminController(Controller):
    path = "/v1/admin"
    guards = [requires_admin]

    @get("/tenants", opt={"response": ObjectList[Tenant], "summary": "List tenants"})
    async def list_tenants(self, gateway: Gateway) -> Response[bytes]:
        return json_response({"object": "list", "data": gateway.tenants.tenants()})

    @post("/tenants", status_code=201, opt={"request": CreateTenant, "response": Tenant, "summary": "Create a tenant"})
    async def create_tenant(self, request: Request, gateway: Gateway, registry: ModelRegistry) -> Response[bytes]:
        body: CreateTenant = decode_request(await request.body(), CreateTenant)
        registry.check_adapter(body.default_adapter)
        fields = {k: v for k, v in msgspec.structs.asdict(body).items() if k != "name" and v is not None}
        return json_response(gateway.tenants.create_tenant(body.name, **fields), 201)

    @get("/tenants/{name:str}", opt={"response": TenantInfo, "summary": "A tenant and its remaining budget"})
    async def get_tenant(self, name: str, gateway: Gateway) -> Response[bytes]:
        tenant = gateway.tenants.tenant(name)
        return json_response({**msgspec.to_builtins(tenant), "budget_remaining": gateway.budgets.remaining(tenant)})

    @patch("/tenants/{name:str}", opt={"request": TenantUpdate, "response": Tenant, "summary": "Change a tenant"})
    async def update_tenant(self, name: str, request: Request, gateway: Gateway, registry: ModelRegistry) -> Response[bytes]:
        update: TenantUpdate = decode_request(await request.body(), TenantUpdate)
        registry.check_adapter(update.default_adapter if isinstance(update.default_adapter, str) else None)
        return json_response(gateway.tenants.update_tenant(name, update))

    @get("/keys", opt={"response": ObjectList[KeyInfo], "summary": "List keys"})
    async def list_keys(self, gateway: Gateway, tenant: str | None = None) -> Response[bytes]:
        return json_response({"object": "list", "data": [_key_out(k) for k in gateway.tenants.keys(tenant)]})

    @post("/keys", status_code=201, opt={"request": CreateKey, "response": NewKey, "summary": "Create a key (shown once)"})
    async def create_key(self, request: Request, gateway: Gateway) -> Response[bytes]:
        body: CreateKey = decode_request(await request.body(), CreateKey)
        if body.expires_at is not None and body.expires_in_days is not None:
            raise InvalidRequest("Give expires_at or expires_in_days, not both.", param="expires_at")
        expires = body.expires_at
        if body.expires_in_days is not None:
            expires = time.time() + body.expires_in_days * 86400
        key, secret = gateway.tenants.create_key(
            body.tenant, role=body.role, name=body.name, expires_at=expires, rpm=body.rpm, tpm=body.tpm
        )
        # The only time the full key is ever shown.
        return json_response({**_key_out(key), "key": secret}, 201)

    @delete("/keys/{key_id:str}", status_code=200, opt={"response": KeyInfo, "summary": "Revoke a key"})
    async def revoke_key(self, key_id: str, gateway: Gateway) -> Response[bytes]:
        return json_response(_key_out(gateway.tenants.revoke_key(key_id)))

    @get("/usage/verify", opt={"response": VerifyResult, "summary": "Check the usage hash chain"})
    async def verify_usage(self, gateway: Gateway) -> Response[bytes]:
        return json_response(gateway.meter.verify())


@get("/v1/usage", opt={"query": UsageQuery, "response": UsageReport, "summary": "Usage totals with cost"})
async def usage_report(request: Request, gateway: Gateway, ctx: RequestContext) -> Response[bytes]:
    """Totals per model, key, day, tenant or route; a user key sees its own tenant, an admin all or one."""
    assert ctx.principal is not None
    params = request.query_params
    group_by = params.get("group_by", "model")
    tenant = params.get("tenant")
    since, until = parse_time(params.get("from"), "from"), parse_time(params.get("to"), "to")
    if not ctx.principal.is_admin:
        if tenant is not None and tenant != ctx.principal.tenant:
            raise PermissionDenied("A user key reads its own tenant's usage only.")
        tenant = ctx.principal.tenant
    rows = gateway.meter.report(group_by=group_by, tenant=tenant, since=since, until=until)  # type: ignore[arg-type]
    return json_response({"object": "list", "group_by": group_by, "from": since, "to": until, "data": rows})


@get("/metrics", sync_to_thread=False, opt={"response": str, "media_type": "text/plain", "summary": "Prometheus metrics"})
def metrics(gateway: Gateway) -> Response[bytes]:
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)
