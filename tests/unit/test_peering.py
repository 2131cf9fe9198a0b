"""Federation without a network: cluster signatures, peer states, the least-loaded choice, forwarding plans."""

from __future__ import annotations

import time

import pytest

from appliance.errors import AuthenticationFailed, PeerUnavailable, SettingsError
from appliance.peering.auth import H_BODY, H_SIGNATURE, H_TENANT, H_TIMESTAMP, SignatureVerifier, body_digest, sign
from appliance.peering.cluster import Cluster, PeerState, least_loaded
from appliance.protocol.cluster import ModelState, NodeState
from appliance.settings import ClusterSettings, load_settings
from appliance.types import EngineStats, Principal

SECRET = "s" * 40
CALLER = Principal(tenant="team-a", key_id="ak_12345678", role="user")
PATH = "/v1/chat/completions"


def verifier(secret: str | None = SECRET, **kw: object) -> SignatureVerifier:
    return SignatureVerifier(lambda node: secret, paths=frozenset({PATH, "/v1/cluster/state"}), **kw)  # type: ignore[arg-type]


def signed(**kw: object) -> dict[str, str]:
    args: dict[str, object] = dict(node="node-a", method="POST", path=PATH, principal=CALLER)
    args.update(kw)
    return sign(args.pop("secret", SECRET), **args)  # type: ignore[arg-type]


# -- signatures --------------------------------------------------------------------------------


def test_a_valid_signature_yields_the_forwarded_caller() -> None:
    principal = verifier()(signed(), "POST", PATH)
    assert principal == Principal(tenant="team-a", key_id="ak_12345678", role="user", forwarded_by="node-a")


def test_requests_without_cluster_headers_fall_through_to_key_auth() -> None:
    assert verifier()({"authorization": "Bearer x"}, "POST", PATH) is None


@pytest.mark.parametrize(
    "headers, method, path, why",
    [
        (lambda: signed(), "POST", "/v1/completions", "tampered path"),
        (lambda: signed(), "GET", PATH, "tampered method"),
        (lambda: {**signed(), H_TENANT: "team-b"}, "POST", PATH, "tampered tenant"),
        (lambda: {**signed(body=b"{}"), H_BODY: body_digest(b'{"x": 1}')}, "POST", PATH, "tampered body digest"),
        (lambda: signed(secret="w" * 40), "POST", PATH, "wrong secret"),
        (lambda: signed(now=time.time() - 120), "POST", PATH, "old timestamp"),
        (lambda: signed(now=time.time() + 120), "POST", PATH, "timestamp in the future"),
        (lambda: {**signed(), H_TIMESTAMP: "soon"}, "POST", PATH, "malformed timestamp"),
        (lambda: {k: v for k, v in signed().items() if k != H_SIGNATURE}, "POST", PATH, "no signature"),
        (lambda: {**signed(), H_SIGNATURE: ""}, "POST", PATH, "empty signature"),
    ],
)
def test_bad_signatures_are_refused(headers, method: str, path: str, why: str) -> None:  # type: ignore[no-untyped-def]
    v = SignatureVerifier(lambda node: SECRET, paths=frozenset({PATH, "/v1/completions"}))
    with pytest.raises(AuthenticationFailed):
        v(headers(), method, path)


def test_a_signature_opens_only_the_forwarded_routes_never_admin() -> None:
    with pytest.raises(AuthenticationFailed, match="not accepted"):
        verifier()(signed(path="/v1/admin/keys"), "POST", "/v1/admin/keys")


def test_a_captured_request_cannot_be_replayed() -> None:
    v, headers = verifier(), signed()
    assert v(headers, "POST", PATH) is not None
    with pytest.raises(AuthenticationFailed, match="Replayed"):
        v(headers, "POST", PATH)


def test_nodes_without_a_secret_here_are_refused() -> None:
    with pytest.raises(AuthenticationFailed, match="Unknown cluster node"):
        verifier(secret=None)(signed(), "POST", PATH)


def test_per_peer_secrets_are_checked_per_node() -> None:
    settings = ClusterSettings(peers=[_peer("node-b", secret="b" * 32), _peer("node-c", secret="c" * 32)])
    cluster = Cluster(settings, _Registry(), port=8080)
    assert cluster.verifier is not None
    assert cluster.verifier(signed(node="node-b", secret="b" * 32), "POST", PATH) is not None
    for node, secret in (("node-b", "c" * 32), ("node-x", "b" * 32)):
        with pytest.raises(AuthenticationFailed):
            cluster.verifier(signed(node=node, secret=secret), "POST", PATH)


# -- settings ----------------------------------------------------------------------------------


def _peer(name: str, url: str = "http://127.0.0.1:9", secret: str = "") -> object:
    from appliance.settings import PeerSettings

    return PeerSettings(name=name, url=url, secret=secret)


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"secret": "short"}, "at least 32"),
        ({"peers": [{"name": "b", "url": "http://h:1"}]}, "need cluster.secret"),
        ({"secret": SECRET, "peers": [{"name": "b", "url": "http://h:1"}, {"name": "b", "url": "http://h:2"}]},
         "unique"),
        ({"secret": SECRET, "peers": [{"name": "b", "url": "ftp://h:1"}]}, "url"),
        ({"secret": SECRET, "peers": [{"name": "b", "url": "http://h:1", "key": "x"}]}, "key"),
    ],
)
def test_cluster_settings_are_validated(tmp_path, tree: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    import tomli_w

    config = tmp_path / "appliance.toml"
    config.write_text(tomli_w.dumps({"cluster": tree}))
    with pytest.raises(SettingsError, match=message):
        load_settings(config=config, env={})


def test_the_cluster_secret_comes_from_the_environment() -> None:
    settings = load_settings(env={"APPLIANCE_CLUSTER_SECRET": SECRET, "APPLIANCE_NODE_NAME": "node-a"})
    assert settings.cluster.secret == SECRET and settings.cluster.node_name == "node-a"
    assert settings.cluster.enabled and not load_settings(env={}).cluster.enabled


# -- peer states and the least-loaded choice ---------------------------------------------------


def model(model_id: str, busy: int = 0, queue: int = 0, status: str = "ready", aliases: list[str] | None = None):  # type: ignore[no-untyped-def]
    return ModelState(id=model_id, kind="chat", status=status, busy_slots=busy, queue_depth=queue,
                      aliases=aliases or [])


def peer(name: str, *models: ModelState) -> PeerState:
    p = PeerState(name, f"http://{name}:8080/", SECRET)
    p.probed(NodeState(node=name, health="ok", models=list(models)))
    return p


def test_least_loaded_picks_the_idlest_up_peer_serving_the_model() -> None:
    b = peer("b", model("gemma", busy=3, queue=1, aliases=["g"]))
    c = peer("c", model("gemma", busy=1, aliases=["g"]))
    d = peer("d", model("other"))
    assert least_loaded([b, c, d], "gemma")[0] is c  # type: ignore[index]
    assert least_loaded([b, c, d], "g")[0] is c  # type: ignore[index]
    assert least_loaded([b, c, d], "gemma", exclude=frozenset({"c"}))[0] is b  # type: ignore[index]
    assert least_loaded([b, c, d], "gemma", below=1) is None
    assert least_loaded([b, c, d], "missing") is None
    c.failed("refused", limit=1)
    assert least_loaded([b, c, d], "gemma")[0] is b  # type: ignore[index]


def test_running_forwards_since_the_last_probe_count_as_load() -> None:
    b, c = peer("b", model("gemma")), peer("c", model("gemma"))
    chosen, epochs = [], []
    for _ in range(4):
        p, _m = least_loaded([b, c], "gemma")  # type: ignore[misc]
        epochs.append((p, p.begin_forward()))
        chosen.append(p.name)
    assert chosen == ["b", "c", "b", "c"]
    first, epoch = epochs[0]
    first.end_forward(epoch)  # finished before a probe saw it: no longer load
    assert (b.started_since_probe, c.started_since_probe) == (1, 2)
    b.probed(NodeState(node="b", health="ok", models=[model("gemma", busy=1)]))
    assert b.started_since_probe == 0
    b.end_forward(epochs[2][1])  # the probe already counted it (or saw it finished): nothing to undo
    assert b.started_since_probe == 0 and b.load(b.models["gemma"]) == 1


def test_ready_beats_loading_and_failed_models_are_never_chosen() -> None:
    b = peer("b", model("gemma", status="loading"))
    c = peer("c", model("gemma", busy=5))
    d = peer("d", model("gemma", status="failed"))
    assert least_loaded([b, c, d], "gemma")[0] is c  # type: ignore[index]
    assert least_loaded([b, d], "gemma")[0] is b  # type: ignore[index]
    assert least_loaded([d], "gemma") is None


def test_a_peer_is_down_after_n_failures_and_up_after_one_good_probe() -> None:
    b = peer("b", model("gemma"))
    b.failed("timeout", limit=3)
    b.failed("timeout", limit=3)
    assert b.up
    b.failed("timeout", limit=3)
    assert b.status == "down"
    b.probed(NodeState(node="b", health="ok"))
    assert b.up and b.failures == 0
    b.refused("Invalid cluster signature")
    assert b.status == "unauthorised" and not b.up
    never = PeerState("n", "http://n:1", SECRET)
    never.failed("refused", limit=3)
    assert never.status == "down"  # never seen: not usable, and reported as down at once


# -- forwarding plans --------------------------------------------------------------------------


class _Manifest:
    def __init__(self, model_id: str) -> None:
        self.id, self.kind, self.format, self.aliases = model_id, "chat", "gguf", []
        self.context_length, self.created = 512, 0
        self.engine_id = model_id


class _Registry:
    """The registry calls the cluster makes, with engine stats set by the test."""

    def __init__(self, *ids: str) -> None:
        self.models = {i: _Manifest(i) for i in ids}
        self.engine: dict[str, int] = {"busy_slots": 0, "queue_depth": 0}

    def resolve(self, name: str):  # type: ignore[no-untyped-def]
        from appliance.errors import ModelNotFound

        if name not in self.models:
            raise ModelNotFound(f"The model '{name}' does not exist.")
        return self.models[name]

    def status(self) -> dict:
        return {i: {"state": "ready", "error": None, "engine": EngineStats(**self.engine)} for i in self.models}

    def manifests(self) -> list:
        return list(self.models.values())

    def context_window(self, manifest: _Manifest) -> int:
        return min(manifest.context_length, 256)

    def health(self) -> str:
        return "ok"


def cluster_with(registry: _Registry, *peers: PeerState, saturated: bool = True) -> Cluster:
    settings = ClusterSettings(secret=SECRET, node_name="a", peers=[_peer(p.name) for p in peers],  # type: ignore[misc]
                               forward_when_saturated=saturated)
    c = Cluster(settings, registry, port=8080)  # type: ignore[arg-type]
    c.peers = list(peers)
    return c


def test_plan_forwards_models_this_node_lacks_but_never_a_forwarded_request() -> None:
    c = cluster_with(_Registry("local"), peer("b", model("remote")))
    assert c.plan(CALLER, "remote") is not None
    assert c.plan(CALLER, "local") is None
    assert c.plan(CALLER, "nowhere") is None  # served (and refused with 404) here
    forwarded = Principal(tenant="team-a", key_id=None, role="user", forwarded_by="b")
    assert c.plan(forwarded, "remote") is None


def test_plan_says_503_when_only_unreachable_peers_have_the_model() -> None:
    b = peer("b", model("remote"))
    b.failed("refused", limit=1)
    with pytest.raises(PeerUnavailable):
        cluster_with(_Registry(), b).plan(CALLER, "remote")


def test_plan_forwards_from_a_saturated_node_only_to_a_less_loaded_peer() -> None:
    registry = _Registry("gemma")
    busy_peer, idle_peer = peer("b", model("gemma", busy=4, queue=2)), peer("c", model("gemma", busy=1))
    c = cluster_with(registry, busy_peer, idle_peer)
    registry.engine = {"busy_slots": 4, "queue_depth": 0}
    assert c.plan(CALLER, "gemma") is None  # every slot busy but nothing waits: not saturated
    registry.engine = {"busy_slots": 4, "queue_depth": 1}
    plan = c.plan(CALLER, "gemma")
    assert plan is not None and plan.below == 5 and c.choose(plan, frozenset())[0] is idle_peer  # type: ignore[index]
    idle_peer.probed(NodeState(node="c", health="ok", models=[model("gemma", busy=4, queue=3)]))
    assert c.plan(CALLER, "gemma") is None
    assert cluster_with(registry, peer("d", model("gemma")), saturated=False).plan(CALLER, "gemma") is None


def test_node_state_reports_models_and_load() -> None:
    registry = _Registry("gemma")
    registry.engine = {"busy_slots": 2, "queue_depth": 1}
    state = cluster_with(registry).node_state()
    assert state.node == "a" and state.health == "ok"
    assert [(m.id, m.status, m.busy_slots, m.queue_depth) for m in state.models] == [("gemma", "ready", 2, 1)]
    assert state.models[0].context_length == 256  # the window a request can use, not the trained 512
