"""The OpenAPI description: every route in it, every body-reading handler declaring its types, answers
of the real ASGI app (fake engines) matching it, /openapi.json and /docs served without a key."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import jsonschema
import msgspec
import pytest
from litestar import Litestar, Request, get, post
from litestar.params import Parameter
from litestar.routes import HTTPRoute
from litestar.testing import TestClient

from appliance.api.gateway import PUBLIC_ROUTES
from appliance.api.openapi import OPT_KEYS, describe
from tests.api.conftest import World, make_client

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
_DECODED = re.compile(r"decode_request\((?:[^()]|\([^()]*\))*?,\s*([A-Za-z_]\w*)\s*\)")


@pytest.fixture
def client(world: World) -> Any:
    with make_client(world, APPLIANCE_EMBEDDING_MODEL="embed-model") as c:
        yield c


@pytest.fixture
def doc(client: TestClient) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return r.json()


def _handlers(app: Litestar) -> list[tuple[HTTPRoute, Any, str]]:
    return [
        (route, handler, method)
        for route in app.routes if isinstance(route, HTTPRoute)
        for handler in route.route_handlers
        for method in handler.http_methods - {"OPTIONS"}
    ]


def test_every_route_of_the_app_is_described(client: TestClient, doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1")
    served = _handlers(client.app)
    assert len(served) > 25
    for route, _, method in served:
        assert method.lower() in doc["paths"].get(route.path_format, {}), f"{method} {route.path_format} is not described"
    described = sum(len(ops) for ops in doc["paths"].values())
    assert described == len(served)
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_every_handler_that_reads_a_body_declares_its_types(client: TestClient) -> None:
    """The description cannot lag the code: a handler that decodes a body names that type in opt."""
    missing = []
    for route, handler, method in _handlers(client.app):
        where = f"{method} {route.path_format} ({handler.handler_name})"
        opt = handler.opt
        assert set(opt) <= set(OPT_KEYS), f"{where}: unknown opt keys {set(opt) - set(OPT_KEYS)}"
        source = inspect.getsource(handler.fn)
        decoded = set(_DECODED.findall(source))
        reads_body = decoded or any(f"request.{m}()" in source for m in ("body", "json", "form"))
        if reads_body and "request" not in opt:
            missing.append(f"{where}: reads a body but declares no opt['request']")
        if decoded and "request" in opt and decoded != {opt["request"].__name__}:
            missing.append(f"{where}: decodes {sorted(decoded)} but declares {opt['request'].__name__}")
        if "request.form()" in source and not opt.get("uploads"):
            missing.append(f"{where}: reads a form but does not declare uploads")
        if "query_params" in source and "query" not in opt:
            missing.append(f"{where}: reads query parameters but declares no opt['query']")
    assert not missing, "\n".join(missing)


def test_every_ref_resolves_and_errors_share_one_body(doc: dict[str, Any]) -> None:
    refs = re.findall(r'"\$ref":\s*"#/([^"]+)"', json.dumps(doc))
    assert refs
    for ref in refs:
        node: Any = doc
        for part in ref.split("/"):
            node = node[part]
    error = doc["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert doc["components"]["schemas"]["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "4XX" in op["responses"] and "5XX" in op["responses"], f"{method} {path}"


def test_public_routes_need_no_key_and_the_rest_a_bearer_key(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    assert {"/openapi.json", "/docs", "/health"} <= PUBLIC_ROUTES
    for path in ("/openapi.json", "/docs", "/health", "/"):
        assert doc["paths"][path]["get"]["security"] == []
    # The handler checks the cluster signature or an admin key itself.
    assert doc["paths"]["/v1/cluster/state"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/v1/admin/tenants"]["get"]


def test_description_and_docs_page_are_served_without_a_key_once_keys_exist(world: World) -> None:
    with make_client(world) as client:
        assert client.post("/v1/admin/tenants", json={"name": "ops"}).status_code == 201
        assert client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}).status_code == 201
        assert client.get("/v1/models").status_code == 401
        assert client.get("/openapi.json").status_code == 200
        page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    assert html.lower().startswith("<!doctype html") and 'fetch("/openapi.json")' in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html  # nothing from elsewhere


def test_request_and_query_schemas_come_from_the_wire_types(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/v1/collections/{name}/search"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/SearchRequest"}
    assert schemas["SearchRequest"]["properties"]["top_k"]["maximum"] == 100
    upload = doc["paths"]["/v1/collections/{name}/documents"]["post"]["requestBody"]["content"]
    assert set(upload) == {"application/json", "multipart/form-data"}
    usage = {p["name"]: p for p in doc["paths"]["/v1/usage"]["get"]["parameters"]}
    assert set(usage) == {"group_by", "tenant", "from", "to"} and usage["tenant"]["schema"] == {"type": "string"}
    assert {p["name"] for p in doc["paths"]["/v1/admin/keys"]["get"]["parameters"]} == {"tenant"}
    ask = doc["paths"]["/v1/collections/{name}/ask"]["post"]["responses"]["200"]["content"]
    assert set(ask) == {"application/json", "text/event-stream"}
    health = doc["paths"]["/health"]["get"]["responses"]
    assert health["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/HealthReport"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def _validate(doc: dict[str, Any], path: str, method: str, response: Any) -> None:
    """Check an answer against the schema the description gives its status and media type."""
    responses = doc["paths"][path][method]["responses"]
    status = str(response.status_code)
    described = responses.get(status) or responses[status[0] + "XX"]
    if "$ref" in described:
        described = doc["components"]["responses"][described["$ref"].rsplit("/", 1)[-1]]
    media = response.headers["content-type"].split(";")[0]
    assert media in described["content"], f"{method} {path} {status}: {media} is not described"
    schema = described["content"][media]["schema"]
    root = {"components": doc["components"]}
    if media == "text/event-stream":
        chunk = schema["properties"]["data"]["else"]["contentSchema"]
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            jsonschema.validate(json.loads(event), {**root, **chunk}, cls=jsonschema.Draft202012Validator)
    elif media == "application/json":
        jsonschema.validate(response.json(), {**root, **schema}, cls=jsonschema.Draft202012Validator)


def test_answers_of_the_app_match_the_description(client: TestClient, doc: dict[str, Any]) -> None:
    assert client.post("/v1/admin/tenants", json={"name": "ops"}).status_code == 201
    admin = client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"})
    _validate(doc, "/v1/admin/keys", "post", admin)
    auth = {"Authorization": f"Bearer {admin.json()['key']}"}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("/health", "get", {}),
        ("/version", "get", {}),
        ("/v1/models", "get", {}),
        ("/v1/models/{model_id}", "get", {"url": "/v1/models/chat-model"}),
        ("/v1/models/{model_id}", "get", {"url": "/v1/models/no-such-model"}),
        ("/v1/chat/completions", "post", {"json": CHAT}),
        ("/v1/chat/completions", "post", {"json": {**CHAT, "stream": True}}),
        ("/v1/chat/completions", "post", {"json": {**CHAT, "max_tokens": 0}}),
        ("/v1/completions", "post", {"json": {"model": "base-model", "prompt": "The sky", "max_tokens": 3}}),
        ("/v1/embeddings", "post", {"json": {"model": "embed-model", "input": ["a", "b"]}}),
        ("/v1/admin/tenants", "post", {"json": {"name": "team-a", "rpm": 100}}),
        ("/v1/admin/tenants", "get", {}),
        ("/v1/admin/tenants/{name}", "get", {"url": "/v1/admin/tenants/team-a"}),
        ("/v1/admin/tenants/{name}", "patch", {"url": "/v1/admin/tenants/team-a", "json": {"rpm": None}}),
        ("/v1/admin/keys", "post", {"json": {"tenant": "team-a", "expires_in_days": 1}}),
        ("/v1/admin/keys", "get", {}),
        ("/v1/admin/usage/verify", "get", {}),
        ("/v1/usage", "get", {"url": "/v1/usage?group_by=route"}),
        ("/v1/usage", "get", {"url": "/v1/usage?from=yesterday"}),
        ("/v1/collections", "post", {"json": {"name": "docs"}}),
        ("/v1/collections", "get", {}),
        ("/v1/collections/{name}/documents", "post",
         {"url": "/v1/collections/docs/documents", "json": {"text": "The library opens at nine.", "id": "hours"}}),
        ("/v1/collections/{name}/documents", "post",
         {"url": "/v1/collections/docs/documents", "files": {"files": ("notes.txt", b"Closed on Sundays.")}}),
        ("/v1/collections/{name}/documents", "get", {"url": "/v1/collections/docs/documents"}),
        ("/v1/collections/{name}/search", "post", {"url": "/v1/collections/docs/search", "json": {"query": "library"}}),
        ("/v1/collections/{name}/ask", "post",
         {"url": "/v1/collections/docs/ask", "json": {"question": "When?", "model": "chat-model"}}),
        ("/v1/collections/{name}/ask", "post",
         {"url": "/v1/collections/docs/ask", "json": {"question": "When?", "model": "chat-model", "stream": True}}),
        ("/v1/collections/{name}/documents/{doc_id}", "delete", {"url": "/v1/collections/docs/documents/hours"}),
        ("/v1/collections/{name}", "delete", {"url": "/v1/collections/docs"}),
        ("/v1/collections/{name}", "delete", {"url": "/v1/collections/docs"}),
        ("/metrics", "get", {}),  # not from loopback: 403
        ("/v1/admin/keys/{key_id}", "delete", {"url": "/v1/admin/keys/ak_00000000"}),
    ]
    statuses = []
    for path, method, kwargs in calls:
        url = kwargs.pop("url", path)
        response = client.request(method.upper(), url, headers=auth, **kwargs)
        assert response.status_code < 500, f"{method} {url}: {response.text}"
        _validate(doc, path, method, response)
        statuses.append(response.status_code)
    assert statuses.count(200) + statuses.count(201) > 25 and {400, 403, 404} <= set(statuses)


# -- describe() on small apps ----------------------------------------------------------------------


class Thing(msgspec.Struct):
    name: str


class Other(msgspec.Struct):
    size: int


class Query(msgspec.Struct):
    since: str | None = None
    limit: int = 10


@post("/things", opt={"request": Thing, "response": Thing, "responses": {409: Thing | Other}})
async def create_thing(request: Request) -> Thing:
    return Thing("x")


@get("/things/{thing_id:int}", opt={"query": Query})
async def get_thing(thing_id: int, request: Request, kind: str | None = None,
                    where: str = Parameter(query="scope")) -> dict[str, int]:
    """Fetch one thing.

    Longer words.
    """
    return {"id": thing_id}


def test_describe_reads_path_query_and_untagged_unions() -> None:
    doc = describe(Litestar([create_thing, get_thing], openapi_config=None))
    op = doc["paths"]["/things/{thing_id}"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["thing_id"] == {"name": "thing_id", "in": "path", "required": True, "schema": {"type": "integer"}}
    assert params["kind"]["required"] is False and params["kind"]["schema"] == {"type": "string"}
    assert params["scope"]["required"] is True
    assert params["limit"]["schema"] == {"type": "integer", "default": 10} and params["since"]["required"] is False
    assert op["summary"] == "Fetch one thing." and "Longer words." in op["description"]
    assert op["responses"]["200"]["content"] == {"application/json": {"schema": {}}}  # no opt response: open
    post_op = doc["paths"]["/things"]["post"]
    conflict = post_op["responses"]["409"]["content"]["application/json"]["schema"]
    assert conflict == {"anyOf": [{"$ref": "#/components/schemas/Thing"}, {"$ref": "#/components/schemas/Other"}]}
    assert post_op["responses"]["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Thing"}


def test_describe_refuses_an_opt_key_it_does_not_know() -> None:
    @get("/typo", opt={"reponse": Thing})
    async def typo() -> None:
        return None

    with pytest.raises(ValueError, match="reponse"):
        describe(Litestar([typo], openapi_config=None))
