"""One settings object: embedded defaults, then a TOML file, then APPLIANCE_* variables, then CLI flags.

Loaded and validated once (`load_settings`); everything else receives the resulting `Settings`.
This is the only module that reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import msgspec
import platformdirs

from appliance.errors import SettingsError

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Threads = Annotated[int, msgspec.Meta(ge=0, le=1024)]


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default: the appliance is reachable only from this machine."""
    port: Port = 8080
    """TCP port to listen on."""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = 8 * 1024 * 1024
    """Largest request body accepted; bigger bodies get 413."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log verbosity of the server process."""


RpcEndpoint = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]+:[0-9]{1,5}$")]


class RpcSplitSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One model split over llama.cpp RPC workers (`appliance peer serve`), e.g. [models.rpc.gemma3-270m]."""

    peers: Annotated[list[RpcEndpoint], msgspec.Meta(min_length=1, max_length=16)]
    """Workers as host:port (IPv4 or a name; a worker on another host is reached through an SSH tunnel)."""
    tensor_split: list[Annotated[float, msgspec.Meta(ge=0)]] | None = None
    """Share of the offloaded layers per device, in order: the workers' devices, then local GPUs; default by free memory."""
    offload_layers: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """Layers placed on the workers (and local GPUs); -1 all of them; the rest stay on this node's CPU."""
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    """How long to wait for a worker's connection and RPC hello before it counts as unreachable."""
    stall_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    """A worker that leaves a step or a ping unanswered this long counts as dead (host down, cable pulled)."""

    def __post_init__(self) -> None:
        if len(set(self.peers)) != len(self.peers):
            raise ValueError("a peer is listed twice")
        if any(not 1 <= int(p.rpartition(":")[2]) <= 65535 for p in self.peers):
            raise ValueError("a peer's port is outside 1-65535")
        if self.tensor_split is not None and (len(self.tensor_split) > 16 or sum(self.tensor_split) <= 0):
            raise ValueError("tensor_split needs at most 16 shares and a positive sum")


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*|%)\s*$", re.IGNORECASE)


class MemoryLimit(msgspec.Struct, frozen=True):
    """A parsed `models.max_memory`: a byte count, or a share of the machine's RAM; neither means unlimited."""

    bytes: int = 0
    ram_fraction: float = 0.0

    @property
    def unlimited(self) -> bool:
        return self.bytes == 0 and self.ram_fraction == 0.0


def parse_max_memory(value: str | int) -> MemoryLimit:
    """"6GB" (10^9), "6GiB" (2^30), "6000000000" or "75%" of RAM; 0 or "" is unlimited. Raises ValueError."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"models.max_memory must not be negative (got {value})")
        return MemoryLimit(bytes=value)
    if not value.strip():
        return MemoryLimit()
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit != "%" and unit not in _SIZE_UNITS):
        raise ValueError(
            f"models.max_memory: {value!r} is not a size: use bytes, a unit (6GB, 6GiB, 512MiB) or a share of RAM (75%)"
        )
    number = float(match.group(1))
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"models.max_memory: {value!r} must be a share of RAM above 0% and at most 100%")
        return MemoryLimit(ram_fraction=number / 100)
    return MemoryLimit(bytes=int(number * _SIZE_UNITS[unit]))


class ModelSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    load: Literal["startup", "lazy"] = "startup"
    """`startup` loads every registered model before /health turns 200; `lazy` loads on first use."""
    load_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0
    """How long a request waits for its model to finish loading before it fails with 503."""
    threads: Threads = 0
    """CPU threads for inference; 0 means one per physical core as the engines decide."""
    n_ctx: Annotated[int, msgspec.Meta(ge=256, le=1 << 20)] = 4096
    """Context window of each GGUF sequence, capped by the model's own trained context length."""
    parallel: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    """Sequences a GGUF model generates at once (continuous batching slots), each with n_ctx tokens of KV."""
    n_batch: Annotated[int, msgspec.Meta(ge=32, le=8192)] = 512
    """Most tokens decoded in one step (prompt chunks plus one token per generating sequence)."""
    prefix_cache_min_tokens: Annotated[int, msgspec.Meta(ge=0)] = 32
    """Reuse a slot's cached prompt prefix only when it is at least this long; 0 turns the prefix cache off."""
    flash_attn: Literal["auto", "on", "off"] = "auto"
    """llama.cpp's flash attention: `auto` (llama-server's default) uses it where the device supports it. A model
    split over RPC workers always runs without it."""
    speculative_draft: Annotated[int, msgspec.Meta(ge=0, le=64)] = 8
    """Most tokens guessed per step by prompt lookup (draftless speculative decoding); 0: never speculate."""
    speculation: Literal["off", "grounded", "all"] = "grounded"
    """Which requests speculate unless they say (`speculation: true|false`) or their model's manifest does:
    `grounded` answers (they copy their sources, where guesses pay), `all`, or none."""
    speculative_ngram: Annotated[int, msgspec.Meta(ge=1, le=16)] = 3
    """Length of the n-gram looked up in the sequence's prompt and output to make a guess."""
    speculative_max_active: Annotated[int, msgspec.Meta(ge=1, le=256)] = 2
    """Speculate only while at most this many sequences generate (a full batch has no compute to spare)."""
    max_queue: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 64
    """Requests that may wait for a slot; beyond it new requests get 503 with Retry-After."""
    queue_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 120.0
    """Longest wait for a free slot before the request fails with 503 queue_timeout."""
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 600.0
    """Longest total time of one generation before it fails with 504 request_timeout."""
    gpu: Literal["auto", "off"] = "auto"
    """`auto` offloads to a GPU when llama.cpp / onnxruntime report one; `off` forces CPU."""
    embedding_batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    """Texts per ONNX run when embedding."""
    max_embedding_inputs: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2048
    """Most inputs one /v1/embeddings request may carry."""
    rpc: dict[str, RpcSplitSettings] = msgspec.field(default_factory=dict)
    """GGUF models split over RPC workers, by model id: [models.rpc.<id>] peers = ["127.0.0.1:50052"]."""
    max_memory: str | int = 0
    """Memory all loaded models may use together ("6GB", "6GiB", bytes, "75%" of RAM); 0: unlimited."""

    def __post_init__(self) -> None:
        parse_max_memory(self.max_memory)  # a bad value stops start-up with the setting's name

    @property
    def memory_limit(self) -> MemoryLimit:
        return parse_max_memory(self.max_memory)


class RetrievalSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    embedding_model: str = "all-minilm-l6-v2"
    """Embedding model (id or alias) that collections are built with."""
    answer_model: str | None = None
    """Model for grounded answers when a request names none; default: the first chat/completion model."""
    resume_on_start: bool = True
    """Re-ingest documents that a crash left half-ingested, once the server has started."""
    rerank_model: str | None = None
    """Cross-encoder (kind rerank) that search and ask use when a request sends `"rerank": true`; none: refused."""
    answer_mode: Literal["generative", "extractive", "auto"] = "generative"
    """Grounded answers when a request names no answer_mode: generated, extracted source sentences, or auto."""
    context_headers: bool = False
    """New collections embed each chunk behind its document title and section heading (existing ones keep theirs)."""
    fusion: Literal["fixed", "adaptive"] = "fixed"
    """Hybrid search weights: fixed 0.6 BM25 / 0.4 vectors, or adaptive (more BM25 when it is sure and the vectors are not)."""


class Price(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    prompt_per_1k: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Price of 1,000 prompt (or embedding) tokens, in the operator's currency."""
    completion_per_1k: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Price of 1,000 generated tokens."""


class GatewaySettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key_rpm: Annotated[int, msgspec.Meta(ge=0)] = 600
    """Requests per minute one API key may make unless the key says otherwise; 0 means unlimited."""
    key_tpm: Annotated[int, msgspec.Meta(ge=0)] = 200_000
    """Tokens (prompt + completion + embedding) per minute per key unless the key says otherwise; 0: unlimited."""
    tenant_rpm: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Requests per minute per tenant unless the tenant says otherwise; 0 means unlimited."""
    tenant_tpm: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Tokens per minute per tenant unless the tenant says otherwise; 0 means unlimited."""
    metrics_access: Literal["loopback", "key", "open"] = "loopback"
    """Who may read /metrics: loopback clients only, any valid API key (or loopback), or anyone."""
    prices: dict[str, Price] = msgspec.field(default_factory=dict)
    """Price table per model id for usage reports, e.g. [gateway.prices."gemma3-270m"] prompt_per_1k = 0.01."""
    cache_ttl_s: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 600.0
    """How long a cached deterministic response is served again; 0 turns the response cache off."""
    cache_max_entries: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1024
    """Most responses kept in the exact-match cache (least recently used go first)."""
    semantic_cache_threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Cosine similarity above which a cached answer to a similar prompt is reused; 0 turns it off."""
    json_logs: bool = True
    """One JSON object per log line (request id, tenant, PII-redacted message)."""
    injection_classifier: str | None = "injection-guard"
    """Model id of an ONNX classifier (kind classifier) screening user turns for prompt injection, besides
    the rules; default the bundled "injection-guard"; "" or None: rules only."""
    retrieved_injection_classifier: str | None = "injection-guard-indirect"
    """The same for retrieved chunks and tool results; default the bundled "injection-guard-indirect"."""
    injection_label: Annotated[str, msgspec.Meta(min_length=1)] = "INJECTION"
    """Which of the classifier's labels means injection; its probability is the injection score."""


NodeName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
MIN_CLUSTER_SECRET = 32


class PeerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Another appliance this node forwards to, e.g. [[cluster.peers]] name = "node-b"."""

    name: NodeName
    """The peer's node name (its cluster.node_name): shown in /health, /v1/models and usage records."""
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#\s]+/?$")]
    """Base URL of the peer's HTTP server, e.g. "http://10.0.0.2:8080" (no path)."""
    secret: str = ""
    """A key shared with this peer only, used both ways instead of cluster.secret; empty: cluster.secret."""


class ClusterSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Federation: appliances that forward requests to each other (off while no secret is set)."""

    node_name: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9._:-]{0,63})?$")] = ""
    """This node's name in the cluster; empty: hostname:port."""
    secret: str = ""
    """Shared cluster secret (HMAC key, at least 32 characters); better set via APPLIANCE_CLUSTER_SECRET."""
    peers: Annotated[list[PeerSettings], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    """Appliances this node probes and forwards to."""
    probe_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    """How often each peer's health, models and load are fetched."""
    probe_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 2.0
    """How long one probe may take before it counts as failed."""
    down_after_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    """Consecutive failed probes after which a peer is marked down (one success brings it back)."""
    forward_when_saturated: bool = True
    """Forward a request for a local model to a less loaded peer when every local slot is busy and requests queue."""
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 600.0
    """Longest wait for a peer's next bytes while forwarding (connecting: at most probe_timeout_s)."""
    signature_max_age_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 60.0
    """Cluster signatures older (or further in the future) than this are refused: bounds replays and clock skew."""

    def __post_init__(self) -> None:
        secrets = [s for s in (self.secret, *(p.secret for p in self.peers)) if s]
        if any(len(s) < MIN_CLUSTER_SECRET for s in secrets):
            raise ValueError(f"a cluster secret must be at least {MIN_CLUSTER_SECRET} characters")
        if any(not (p.secret or self.secret) for p in self.peers):
            raise ValueError("peers need cluster.secret (or a secret of their own)")
        names = [p.name for p in self.peers]
        if len(set(names)) != len(names) or (self.node_name and self.node_name in names):
            raise ValueError("peer names must be unique and differ from cluster.node_name")

    @property
    def enabled(self) -> bool:
        return bool(self.secret or any(p.secret for p in self.peers))


RouteName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
Need = Literal["response_format", "tools", "collection"]


class RouteRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A rule of a route, e.g. [[routing.auto.rules]]: when every condition given holds, `use` is the ladder."""

    use: Annotated[list[RouteName], msgspec.Meta(min_length=1, max_length=16)]
    """Candidates for requests this rule matches, in order (model ids, aliases or other routes)."""
    tenants: list[str] | None = None
    """Matches requests of these tenants only; None: any tenant."""
    needs: list[Need] = []
    """Matches requests that use any of these: a JSON `response_format`, `tools`, a `collection`; empty: any request."""
    min_prompt_chars: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Matches prompts (the messages' text) at least this many characters long."""
    max_prompt_chars: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """Matches prompts at most this many characters long; None: no upper bound."""


class SplitVariant(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One arm of a traffic split, e.g. {model = "smollm2-135m", weight = 10}."""

    model: RouteName
    """The model id, alias or route that serves this variant's requests first."""
    weight: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    """Its share of the traffic: weight / the sum of the split's weights (0: no new traffic)."""
    name: RouteName | None = None
    """The variant's name in usage records and `eval compare`; default: `model`."""

    @property
    def label(self) -> str:
        return self.name or self.model


class ShadowSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A candidate model that answers a copy of a share of a route's requests; its output never reaches the client."""

    model: RouteName
    """The candidate: a chat model id or alias of this node (not a route)."""
    share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1
    """The fraction of the route's requests copied to it."""
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    """Shadow runs of this route at once; a request that finds them all busy is not shadowed (recorded as skipped)."""
    keep_chars: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 2000
    """Characters of each output (the served one's and the shadow's) stored with the record; its SHA-256 covers all of it."""


Sticky = Literal["key", "conversation", "none"]


class RouteSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A virtual model id, e.g. [routing.auto]: an ordered ladder of candidate models, and rules choosing it."""

    candidates: Annotated[list[RouteName], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=list)
    """The ladder when no rule matches: tried in order, the next when one is loading, failed, full or timed out."""
    rules: Annotated[list[RouteRule], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=list)
    """Checked in order; the first that matches gives the ladder instead of `candidates`."""
    split: Annotated[list[SplitVariant], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=list)
    """Canary / A/B: when no rule matches, each request is given a variant by weight; its model comes first,
    then the other variants' (and `candidates`) as the fallback ladder."""
    sticky: Sticky = "key"
    """How a split assigns: `key` (the API key; the tenant without keys), `conversation` (the X-Conversation-Id
    header, else the first system and user messages), `none` (each request drawn anew)."""
    shadow: ShadowSettings | None = None
    """Copy a share of the requests to a candidate model in the background and record its answer beside the served one."""
    load_wait_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    """How long a request waits for a loading candidate before it moves to the next one."""
    cached_fallback: bool = True
    """When every candidate failed, serve a cached answer to the same request (any candidate's) before the 503."""
    mode: Literal["fallback", "cascade"] = "fallback"
    """`cascade`: a whole (non-streamed) answer below `cascade_min_logprob`, or an ungrounded grounded answer, is asked of the next candidate too; the better answer is returned."""
    cascade_min_logprob: Annotated[float, msgspec.Meta(le=0)] = -1.0
    """Cascade mode's confidence floor: the mean log-probability of the answer's tokens."""

    def names(self) -> list[str]:
        """Every model or route this route names (candidates, rules, split; not the shadow)."""
        return [*self.candidates, *(c for rule in self.rules for c in rule.use), *(v.model for v in self.split)]


def _check_route(name: str, route: RouteSettings, routes: dict[str, RouteSettings]) -> None:
    if not route.candidates and not route.split:
        raise ValueError(f"routing.{name}: give `candidates` (a ladder) or `split` (weighted variants)")
    if route.split:
        if len(route.split) < 2:
            raise ValueError(f"routing.{name}.split: a split needs two variants or more (one model: use `candidates`)")
        labels = [v.label for v in route.split]
        if len(set(labels)) != len(labels):
            raise ValueError(f"routing.{name}.split: variant names must differ ({', '.join(labels)}); set `name`")
        if sum(v.weight for v in route.split) <= 0:
            raise ValueError(f"routing.{name}.split: the weights add up to 0; give a variant a weight above 0")
    if route.shadow is not None and route.shadow.model in routes:
        raise ValueError(f"routing.{name}.shadow: '{route.shadow.model}' is a route; a shadow is one model id")


def check_routes(routes: dict[str, RouteSettings]) -> None:
    """Refuse a route that names itself through other routes (a cycle), and splits and shadows that make no
    sense. Unknown models are checked against the registry when the app is built (services/routing.py)."""
    for name, route in routes.items():
        _check_route(name, route, routes)

    def refs(name: str) -> list[str]:
        return [c for c in routes[name].names() if c in routes]

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for ref in refs(name):
            if state.get(ref) == 1:
                cycle = " -> ".join([*path[path.index(ref):], ref])
                raise ValueError(f"routing: the routes form a cycle ({cycle})")
            if ref not in state:
                visit(ref, [*path, ref])
        state[name] = 2

    for name in routes:
        if name not in state:
            visit(name, [name])


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: Path = Path(platformdirs.user_data_dir("appliance", appauthor=False))
    """Where models and state live. Models are under DATA_DIR/models/<id>/."""
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    models: ModelSettings = msgspec.field(default_factory=ModelSettings)
    retrieval: RetrievalSettings = msgspec.field(default_factory=RetrievalSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    cluster: ClusterSettings = msgspec.field(default_factory=ClusterSettings)
    routing: dict[RouteName, RouteSettings] = msgspec.field(default_factory=dict)
    """Virtual model ids with a fallback ladder, e.g. [routing.auto] candidates = ["smollm2-135m", "gemma3-270m"]."""

    def __post_init__(self) -> None:
        check_routes(self.routing)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


# Environment variable -> (section, field). Section None means a top-level field.
_ENV_FIELDS: dict[str, tuple[str | None, str]] = {
    "APPLIANCE_DATA_DIR": (None, "data_dir"),
    "APPLIANCE_HOST": ("server", "host"),
    "APPLIANCE_PORT": ("server", "port"),
    "APPLIANCE_MAX_BODY_BYTES": ("server", "max_body_bytes"),
    "APPLIANCE_LOG_LEVEL": ("server", "log_level"),
    "APPLIANCE_MODEL_LOAD": ("models", "load"),
    "APPLIANCE_THREADS": ("models", "threads"),
    "APPLIANCE_N_CTX": ("models", "n_ctx"),
    "APPLIANCE_GPU": ("models", "gpu"),
    "APPLIANCE_PARALLEL": ("models", "parallel"),
    "APPLIANCE_MAX_QUEUE": ("models", "max_queue"),
    "APPLIANCE_SPECULATIVE_DRAFT": ("models", "speculative_draft"),
    "APPLIANCE_SPECULATION": ("models", "speculation"),
    "APPLIANCE_FLASH_ATTN": ("models", "flash_attn"),
    "APPLIANCE_MAX_MEMORY": ("models", "max_memory"),
    "APPLIANCE_METRICS_ACCESS": ("gateway", "metrics_access"),
    "APPLIANCE_JSON_LOGS": ("gateway", "json_logs"),
    "APPLIANCE_CACHE_TTL_S": ("gateway", "cache_ttl_s"),
    "APPLIANCE_SEMANTIC_CACHE_THRESHOLD": ("gateway", "semantic_cache_threshold"),
    "APPLIANCE_INJECTION_CLASSIFIER": ("gateway", "injection_classifier"),
    "APPLIANCE_RETRIEVED_INJECTION_CLASSIFIER": ("gateway", "retrieved_injection_classifier"),
    "APPLIANCE_INJECTION_LABEL": ("gateway", "injection_label"),
    "APPLIANCE_EMBEDDING_MODEL": ("retrieval", "embedding_model"),
    "APPLIANCE_RERANK_MODEL": ("retrieval", "rerank_model"),
    "APPLIANCE_CLUSTER_SECRET": ("cluster", "secret"),
    "APPLIANCE_NODE_NAME": ("cluster", "node_name"),
}


def _set(tree: dict[str, Any], section: str | None, field: str, value: Any) -> None:
    target = tree if section is None else tree.setdefault(section, {})
    if not isinstance(target, dict):
        raise SettingsError(f"[{section}] must be a table")
    target[field] = value


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str | None, str], Any] | None = None,
) -> Settings:
    """Build the validated settings. `overrides` come from CLI flags and win over everything."""
    env = os.environ if env is None else env
    if config is None and env.get("APPLIANCE_CONFIG"):
        config = Path(env["APPLIANCE_CONFIG"])
    tree: dict[str, Any] = {}
    if config is not None:
        try:
            tree = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"config file {config} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read config file {config}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config} is not valid TOML: {exc}") from None
    for name, (section, field) in _ENV_FIELDS.items():
        if name in env:
            _set(tree, section, field, env[name])
    for (section, field), value in (overrides or {}).items():
        if value is not None:
            _set(tree, section, field, value)
    try:
        # str_values: environment strings such as "8080" convert to the field's type.
        settings = msgspec.convert(tree, Settings, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {exc}") from None
    return msgspec.structs.replace(settings, data_dir=settings.data_dir.expanduser())


def _decode_path(type_: type, obj: Any) -> Any:
    if type_ is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError
