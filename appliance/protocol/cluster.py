"""What one appliance tells its peers about itself: GET /v1/cluster/state."""

from __future__ import annotations

import msgspec


class ModelState(msgspec.Struct, kw_only=True):
    """A model a node serves, as its /v1/models card plus how busy it is right now."""

    id: str
    kind: str
    format: str = ""
    aliases: list[str] = []
    context_length: int | None = None
    created: int = 0
    status: str = "pending"
    """Load state: pending (lazy), loading, ready, failed."""
    busy_slots: int = 0
    """Sequences generating now (0 for engines without slots, such as embeddings)."""
    queue_depth: int = 0
    """Requests waiting for a slot."""

    @property
    def load(self) -> int:
        return self.busy_slots + self.queue_depth

    @property
    def usable(self) -> bool:
        return self.status != "failed"


class NodeState(msgspec.Struct, kw_only=True):
    node: str
    """The answering node's cluster.node_name."""
    health: str
    """ok, loading or degraded, as in its /health."""
    models: list[ModelState] = []
    time: float = 0.0
    """The node's clock (Unix seconds): peers compare it with theirs to spot clock skew."""
