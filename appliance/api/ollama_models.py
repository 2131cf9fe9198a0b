"""Ollama's descriptions of a model (/api/tags, /api/ps, /api/show), built from its manifest at the edge:
the wire types are in protocol/ollama.py, which knows nothing of manifests."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from appliance.modelstore.manifest import Manifest
from appliance.protocol.ollama import (
    ListedModel,
    ModelDetails,
    RunningModel,
    ShowResponse,
    created_at,
    listed_name,
)


_QUANT = re.compile(r"(?i)(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?=[-_.]|$)")
_SIZE = re.compile(r"(?i)(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([MBK])(?=[-_.]|$)")


def model_details(manifest: Manifest) -> ModelDetails:
    family = manifest.architecture or ""
    stem = manifest.file.name.rsplit(".", 1)[0]
    quant = _QUANT.search(stem) if manifest.format == "gguf" else None
    size = _SIZE.search(stem) or _SIZE.search(manifest.id)
    return ModelDetails(
        format=manifest.format,
        family=family,
        families=[family] if family else None,
        parameter_size=f"{size.group(1)}{size.group(2).upper()}" if size else "",
        quantization_level=quant.group(1).upper() if quant else "",
    )


def listed_model(manifest: Manifest) -> ListedModel:
    """A model, or `BASE:ADAPTER` for a LoRA adapter (its details name the base as `parent_model`)."""
    name = listed_name(manifest.id)
    details = model_details(manifest)
    if manifest.adapter is not None:
        details = msgspec.structs.replace(details, parent_model=manifest.engine_id)
    return ListedModel(
        name=name,
        model=name,
        modified_at=created_at(manifest.created),
        size=sum(f.size for f in manifest.files()),
        digest=manifest.file.sha256,
        details=details,
    )


def _route_details() -> ModelDetails:
    return ModelDetails(format="route", family="", families=None, parameter_size="", quantization_level="")


def _route_digest(route: str, names: list[str]) -> str:
    """A routed id has no file: its digest is that of its name and candidates (it changes when they do)."""
    return hashlib.sha256("\0".join([route, *names]).encode()).hexdigest()


def listed_route(route: str, models: list[Manifest], remote: list[str]) -> ListedModel:
    """A routed model id (settings [routing.<name>]) in /api/tags: no file of its own, size 0.
    `models`: its models here the caller may use; `remote`: its candidates only cluster peers serve."""
    name = listed_name(route)
    return ListedModel(
        name=name, model=name, modified_at=created_at(max((m.created for m in models), default=0)), size=0,
        digest=_route_digest(route, [*(m.id for m in models), *remote]), details=_route_details(),
    )


def route_show_response(
    route: str, models: list[Manifest], remote: list[str], context_window: int | None
) -> ShowResponse:
    """/api/show of a routed model id: its candidates (this node's, as the caller may use them, then those
    only peers serve), the smallest context among this node's."""
    capabilities = ["completion"] if models and all(m.kind != "chat" for m in models) else ["completion", "tools"]
    info: dict[str, Any] = {"general.basename": route, "general.type": "route",
                            "route.candidates": [m.id for m in models]}
    if remote:
        info["route.peer_candidates"] = remote
    if context_window is not None:
        info["route.context_length"] = context_window
    lines = [
        "# A routed model id of the appliance ([routing." + route + "] in its settings): each request is served",
        "# by the first of these models that can serve it now",
        *(f"# candidate {m.id}" for m in models),
        *(f"# candidate {name} (on cluster peers)" for name in remote),
    ]
    return ShowResponse(
        modelfile="\n".join(lines) + "\n", parameters="", template="", details=_route_details(), model_info=info,
        capabilities=capabilities, modified_at=created_at(max((m.created for m in models), default=0)), aliases=[],
    )


def running_model(
    manifest: Manifest, status: dict[str, Any], context_window: int | None, expires_at: float | None
) -> RunningModel:
    name = listed_name(manifest.id)
    return RunningModel(
        name=name,
        model=name,
        size=status.get("memory_estimate_bytes") or sum(f.size for f in manifest.files()),
        digest=manifest.file.sha256,
        details=model_details(manifest),
        context_length=context_window,
        expires_at=msgspec.UNSET if expires_at is None else created_at(expires_at),
    )


# Every chat model takes tools: through its template when the template knows them, else the fallback format.
_CAPABILITIES = {"chat": ["completion", "tools"], "completion": ["completion"], "embedding": ["embedding"]}


def ollama_serves(manifest: Manifest) -> bool:
    """Whether Ollama's API can use the model (generate, chat or embed): classifiers and rerankers are not listed."""
    return manifest.kind in _CAPABILITIES


def show_response(manifest: Manifest, context_window: int | None) -> ShowResponse:
    arch = manifest.architecture
    info: dict[str, Any] = {"general.basename": manifest.id}
    if arch:
        info["general.architecture"] = arch
    prefix = arch or manifest.format
    if context_window is not None:
        info[f"{prefix}.context_length"] = context_window
    if manifest.embedding_dim is not None:
        info[f"{prefix}.embedding_length"] = manifest.embedding_dim
    params = _parameters(manifest)
    template = manifest.chat_template or ""
    modelfile = "\n".join(
        [
            "# Modelfile generated by the appliance, for reading: models are added with `appliance models import`",
            f"FROM {manifest.id}",
            *([f'TEMPLATE """{template}"""'] if template else []),
            *(f"PARAMETER {name} {value}" for name, value in params),
        ]
    )
    return ShowResponse(
        modelfile=modelfile + "\n",
        parameters="\n".join(f"{name:<30} {value}" for name, value in params),
        template=template,
        details=model_details(manifest),
        model_info=info,
        capabilities=list(_CAPABILITIES.get(manifest.kind, [])),
        modified_at=created_at(manifest.created),
        aliases=list(manifest.aliases),
    )


def _parameters(manifest: Manifest) -> list[tuple[str, str]]:
    if manifest.kind not in ("chat", "completion"):
        return []
    s = manifest.sampling
    params = [(name, str(getattr(s, name))) for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")]
    if s.max_tokens is not None:
        params.append(("num_predict", str(s.max_tokens)))
    params.extend(("stop", msgspec.json.encode(stop).decode()) for stop in manifest.stop)
    return params
