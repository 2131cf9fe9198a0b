"""The OpenAPI 3.1 description of every route, from the msgspec types the handlers use.

Handlers decode their own bodies (`decode_request`), so Litestar cannot see the wire types and its
own OpenAPI is off. Each handler names them in its `opt` instead:

    @post("/chat/completions", opt={"request": ChatCompletionRequest, "response": ChatCompletion,
                                     "stream": ChatCompletionChunk, "summary": "Chat completion"})

`describe(app)` walks the app's routes and writes one document; msgspec writes the schemas of every
declared type at once, so a type several routes share is one component. A route without `opt` is
still described, with its path, methods and status, and an open schema.
"""

from __future__ import annotations

import inspect
from importlib import resources
from types import UnionType
from typing import Any, Generic, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.constants import RESERVED_KWARGS
from litestar.handlers import HTTPRouteHandler
from litestar.params import ParameterKwarg
from litestar.routes import HTTPRoute

from appliance.api.errors import ErrorBody
from appliance.api.gateway import METRICS_ROUTE, PUBLIC_ROUTES
from appliance.policy.tenancy import ApiKey, Tenant
from appliance.protocol.documents import Answer, Source

OPT_KEYS = {
    "request": "the JSON body's type (what the handler passes to decode_request)",
    "response": "the success body's type",
    "stream": "with `stream: true`: the type of each server-sent event's `data:`",
    "ndjson": "the type of each line of a streamed NDJSON answer",
    "responses": "{status: type} for other statuses with a body that is not the error body",
    "query": "a Struct whose fields are query parameters the handler reads from request.query_params",
    "uploads": "True: the route also takes files as multipart/form-data",
    "media_type": "the success body's media type when it is not JSON",
    "security": "the route's security requirements, where the handler checks them itself",
    "summary": "one line for the docs page (else the handler's docstring)",
    "tag": "the group on the docs page (else the handler's module)",
}
_TAGS = {"openai": "OpenAI", "app": "Server", "openapi": "Server", "api": "Server"}
_SCHEMA_REF = "#/components/schemas/{name}"
_ERROR = {"$ref": "#/components/responses/Error"}
_OPEN = {"description": "Not described yet.", "content": {"application/json": {"schema": {}}}}


# -- shapes of answers that handlers build as dicts ------------------------------------------------
# Described here so the document says what the wire carries; the API fuzz test checks the server
# keeps to them.

T = TypeVar("T")


class ObjectList(msgspec.Struct, Generic[T]):
    data: list[T]
    object: Literal["list"] = "list"


class ModelStatus(msgspec.Struct):
    state: Literal["pending", "loading", "ready", "failed", "unloaded"]
    kind: str
    error: str | None
    load_seconds: float | None
    loads: int
    unloads: int
    in_use: int
    memory_estimate_bytes: int | msgspec.UnsetType = msgspec.UNSET
    engine: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    """Engine statistics (slots, queue, cache), for engines that keep them."""


class HealthReport(msgspec.Struct):
    """`ok` when the server can serve; `loading` or `degraded` (a model failed) answer 503."""

    status: Literal["ok", "loading", "degraded"]
    waiting: list[str]
    """Models that load on their first request (lazy loading, or unloaded under a memory limit)."""
    models: dict[str, ModelStatus]
    cluster: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    """With federation on: this node's name and each peer's state."""


class VersionInfo(msgspec.Struct):
    version: str
    llama_cpp_python: str | None
    onnxruntime: str | None


class UsageQuery(msgspec.Struct):
    group_by: Literal["model", "key", "day", "tenant", "route"] = "model"
    tenant: str | None = None
    """Admin keys: one tenant (a user key always reads its own)."""
    from_: str | None = msgspec.field(default=None, name="from")
    """An ISO 8601 date or date-time (UTC unless it says otherwise), or Unix seconds."""
    to: str | None = None
    """As `from`; the window ends before it."""


class UsageRow(msgspec.Struct):
    """Totals of one group; the group's value is under the `group_by` name (`model`, `key`, ...)."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    embedding_tokens: int
    retrieved_chunks: int
    errors: int
    cost: float


class UsageReport(msgspec.Struct):
    group_by: str
    from_: float | None = msgspec.field(name="from")
    to: float | None
    data: list[UsageRow]
    object: Literal["list"] = "list"


class CollectionInfo(msgspec.Struct):
    name: str
    documents: int | msgspec.UnsetType = msgspec.UNSET
    """Counts are present once the collection has been opened since the server started."""
    chunks: int | msgspec.UnsetType = msgspec.UNSET


class CollectionDeleted(msgspec.Struct):
    name: str
    deleted: bool


class DocumentInfo(msgspec.Struct):
    id: str
    title: str
    source: str
    metadata: dict[str, Any]
    state: str
    chunks: int
    created: float
    updated: float


class DocumentDeleted(msgspec.Struct):
    id: str
    deleted: bool


class IngestedDocument(msgspec.Struct):
    document_id: str | None
    """None for an upload that failed before it had an id (a file that could not be parsed)."""
    status: Literal["ingested", "unchanged", "failed"]
    chunks: int = 0
    error: str | None = None
    source: str | msgspec.UnsetType = msgspec.UNSET
    """The uploaded file's name (uploads only)."""


class IngestReport(msgspec.Struct):
    collection: str
    results: list[IngestedDocument]
    ingested: int
    unchanged: int
    failed: int


class AskSources(msgspec.Struct, tag_field="type", tag="sources"):
    sources: list[Source]
    quarantined: list[dict[str, str]]


class AskDelta(msgspec.Struct, tag_field="type", tag="delta"):
    text: str


class AskDone(Answer, tag_field="type", tag="done"):
    """The last event: the whole answer, as /ask answers without streaming."""


AskEvent = AskSources | AskDelta | AskDone


class Budget(msgspec.Struct):
    daily: int | None
    monthly: int | None


class TenantInfo(Tenant, kw_only=True):
    budget_remaining: Budget
    """Tokens left in the current day and month; None: no budget."""


class KeyInfo(ApiKey, kw_only=True):
    active: bool


class NewKey(KeyInfo, kw_only=True):
    key: str
    """The secret: shown this once, never stored."""


# -- the document ----------------------------------------------------------------------------------


class _Operation(NamedTuple):
    path: str
    method: str
    route: HTTPRoute
    handler: HTTPRouteHandler


def operations(app: Litestar) -> list[_Operation]:
    """Every (path, method) the app serves, but the OPTIONS answers Litestar adds by itself."""
    out = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            for method in sorted(handler.http_methods - {"OPTIONS"}):
                out.append(_Operation(route.path_format, method.lower(), route, handler))
    return out


def describe(app: Litestar, *, title: str = "Appliance API", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`. Raises ValueError for an `opt` key this module does not know."""
    ops = operations(app)
    types: list[Any] = [ErrorBody]
    for op in ops:
        unknown = set(op.handler.opt) - set(OPT_KEYS)
        if unknown:
            raise ValueError(f"{op.method.upper()} {op.path}: unknown opt keys {sorted(unknown)}")
        types.extend(_declared_types(op))
    unique = list(dict.fromkeys(types))
    split = {t: _members(t) for t in unique}
    plain = list(dict.fromkeys(m for members in split.values() for m in members))
    schemas, components = msgspec.json.schema_components(plain, ref_template=_SCHEMA_REF)
    schema_of = dict(zip(plain, schemas))
    for t, members in split.items():
        if members != [t]:
            schema_of[t] = {"anyOf": [schema_of[m] for m in members]}
    paths: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    for op in ops:
        paths.setdefault(op.path, {})[op.method] = _operation(op, schema_of, names)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "A local LLM server that speaks the OpenAI API, with document collections, tenants and keys. "
                "Every answer carries an `X-Request-Id` header; every error has OpenAI's body "
                "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                "Error": {
                    "description": "An error, in OpenAI's shape.",
                    "content": {"application/json": {"schema": schema_of[ErrorBody]}},
                }
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "An API key (`Authorization: Bearer ak_...`) from `appliance keys create`. "
                        "A server bound to loopback with no keys created serves without one."
                    ),
                }
            },
        },
        "security": [{"bearer": []}],
    }


def _members(type_: Any) -> list[Any]:
    """A union msgspec cannot describe as one type (untagged Structs: OllamaError | ErrorBody), as its members."""
    if get_origin(type_) not in (Union, UnionType):
        return [type_]
    try:
        msgspec.json.schema(type_)
    except TypeError:
        return list(get_args(type_))
    return [type_]


def _declared_types(op: _Operation) -> list[Any]:
    opt = op.handler.opt
    found = [opt[k] for k in ("request", "response", "stream", "ndjson") if k in opt]
    found.extend(opt.get("responses", {}).values())
    if "query" in opt:
        found.extend(f.type for f in msgspec.structs.fields(opt["query"]))
    found.extend(p.type for p in op.route.path_parameters.values() if p.type in (int, float))
    found.extend(annotation for _, annotation, _ in _signature_query(op))
    return found


def _signature_query(op: _Operation) -> list[tuple[str, Any, bool]]:
    """Query parameters the handler's signature declares: (name, type, required)."""
    handler = op.handler
    skip = RESERVED_KWARGS | set(handler.resolve_dependencies()) | set(op.route.path_parameters)
    out = []
    for name, param in handler.parsed_fn_signature.parameters.items():
        kwarg = param.kwarg_definition
        if name in skip or (isinstance(kwarg, ParameterKwarg) and (kwarg.header or kwarg.cookie)):
            continue
        query = kwarg.query if isinstance(kwarg, ParameterKwarg) and kwarg.query else name
        out.append((query, param.annotation, param.is_required))
    return out


def _operation(op: _Operation, schema_of: dict[Any, Any], names: set[str]) -> dict[str, Any]:
    handler, opt = op.handler, op.handler.opt
    doc = inspect.cleandoc(handler.fn.__doc__ or "")  # not getdoc: it would inherit the decorator's
    module = handler.fn.__module__.rsplit(".", 1)[-1]
    tag = opt.get("tag") or _TAGS.get(module, module.title())
    operation_id = handler.handler_name
    for n in range(2, 100):  # one handler may serve several paths (aliases); ids must be unique
        if operation_id not in names:
            break
        operation_id = f"{module}_{handler.handler_name}" + (f"_{n}" if n > 2 else "")
    names.add(operation_id)
    out: dict[str, Any] = {
        "operationId": operation_id,
        "summary": opt.get("summary") or doc.split("\n", 1)[0] or handler.handler_name.replace("_", " "),
        "tags": [tag],
    }
    if doc:
        out["description"] = doc
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": schema_of.get(p.type, {"type": "string"})}
        for name, p in op.route.path_parameters.items()
    ]
    query = [(name, schema_of[annotation], required, None) for name, annotation, required in _signature_query(op)]
    if "query" in opt:
        query.extend(
            (f.encode_name, schema_of[f.type], f.required, f.default) for f in msgspec.structs.fields(opt["query"])
        )
    for name, schema, required, default in query:
        schema = _not_null(schema)
        if default not in (None, msgspec.NODEFAULT):
            schema = {**schema, "default": msgspec.to_builtins(default)}
        parameters.append({"name": name, "in": "query", "required": required, "schema": schema})
    if parameters:
        out["parameters"] = parameters
    if "request" in opt:
        content = {"application/json": {"schema": schema_of[opt["request"]]}}
        if opt.get("uploads"):
            content["multipart/form-data"] = {
                "schema": {
                    "type": "object",
                    "description": "Files to ingest, under any field name.",
                    "properties": {"files": {"type": "array", "items": {"contentMediaType": "application/octet-stream"}}},
                }
            }
        out["requestBody"] = {"required": True, "content": content}
    out["responses"] = _responses(op, schema_of)
    if "security" in opt:
        out["security"] = opt["security"]
    elif op.path in PUBLIC_ROUTES:
        out["security"] = []
    elif op.path == METRICS_ROUTE:
        out["security"] = [{}, {"bearer": []}]  # gateway.metrics_access: loopback (default), key or open
    return out


def _sse_event(data: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 describes each event; 3.2 would call this itemSchema)."""
    return {
        "type": "object",
        "description": "With `stream: true`: events whose `data` is one JSON chunk, then `data: [DONE]`. "
        "A failure after the stream began ends it with an error event (the error body).",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json", "contentSchema": {"anyOf": [data, error]}},
            }
        },
    }


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: `X | None` is described as X."""
    options = [s for s in schema.get("anyOf", ()) if s != {"type": "null"}]
    if len(options) == len(schema.get("anyOf", ())):
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**rest, **options[0]} if len(options) == 1 else {**rest, "anyOf": options}


def _responses(op: _Operation, schema_of: dict[Any, Any]) -> dict[str, Any]:
    handler, opt = op.handler, op.handler.opt
    content: dict[str, Any] = {}
    if "response" in opt:
        content[opt.get("media_type", "application/json")] = {"schema": schema_of[opt["response"]]}
    if "stream" in opt:
        content["text/event-stream"] = {"schema": _sse_event(schema_of[opt["stream"]], schema_of[ErrorBody])}
    if "ndjson" in opt:
        content["application/x-ndjson"] = {
            "schema": schema_of[opt["ndjson"]],
            "description": "Streamed: one JSON object of this type per line.",
        }
    ok = {"description": "Success.", "content": content} if content else dict(_OPEN)
    responses: dict[str, Any] = {str(handler.status_code): ok}
    for status, type_ in opt.get("responses", {}).items():
        responses[str(status)] = {"description": "See the schema.", "content": {"application/json": {"schema": schema_of[type_]}}}
    responses.setdefault("4XX", _ERROR)
    responses.setdefault("5XX", _ERROR)
    return responses


# -- the routes ------------------------------------------------------------------------------------


def openapi_handlers(page_headers: dict[str, str]) -> list[Any]:
    """GET /openapi.json (built on first use: it needs the finished app) and GET /docs, which renders it."""
    built: list[bytes] = []
    page = (resources.files("appliance") / "web" / "docs.html").read_bytes()

    @get("/openapi.json", sync_to_thread=False, opt={"response": dict[str, Any], "summary": "This description"})
    def openapi_json(request: Request) -> Response[bytes]:
        """The OpenAPI 3.1 description of every route (public: it is the same on every appliance)."""
        if not built:
            built.append(msgspec.json.encode(describe(request.app)))
        return Response(built[0], media_type=MediaType.JSON)

    @get("/docs", sync_to_thread=False, opt={"response": str, "media_type": "text/html", "summary": "API docs page"})
    def docs() -> Response[bytes]:
        """A page that renders /openapi.json, with a form to try each route; it loads nothing from elsewhere."""
        return Response(page, media_type=MediaType.HTML, headers=page_headers)

    return [openapi_json, docs]
