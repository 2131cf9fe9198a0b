"""Embeddings: resolve the model, run the batched encoder off the event loop."""

from __future__ import annotations

import asyncio

from appliance.engines.registry import ModelRegistry
from appliance.errors import InvalidRequest
from appliance.modelstore.manifest import Manifest
from appliance.protocol.openai import EmbeddingRequest
from appliance.services.policy import OPEN_POLICY, RequestPolicy
from appliance.types import Embeddings


class EmbeddingService:
    def __init__(self, registry: ModelRegistry, *, max_inputs: int) -> None:
        self._registry = registry
        self._max_inputs = max_inputs

    async def embed(
        self, request: EmbeddingRequest, policy: RequestPolicy = OPEN_POLICY
    ) -> tuple[Manifest, Embeddings]:
        manifest = self._registry.resolve(request.model, kinds=("embedding",))
        policy.allow_model(manifest)
        texts = request.texts()
        if len(texts) > self._max_inputs:
            raise InvalidRequest(
                f"Too many inputs: {len(texts)} (at most {self._max_inputs} per request).", param="input"
            )
        if request.dimensions is not None and request.dimensions != manifest.embedding_dim:
            raise InvalidRequest(
                f"Model {manifest.id} produces {manifest.embedding_dim}-dimensional embeddings; "
                f"dimensions={request.dimensions} is not supported.",
                param="dimensions",
            )
        texts = await asyncio.to_thread(policy.screen_input, texts, instructions=False)
        async with self._registry.use(manifest) as engine:
            tokens = sum(await asyncio.to_thread(engine.count_tokens, texts))
            policy.reserve(manifest, tokens, 0)
            return manifest, await asyncio.to_thread(engine.embed, texts)
