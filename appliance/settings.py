"""One settings object: embedded defaults, then a TOML file, then APPLIANCE_* variables, then CLI flags.

Loaded and validated once (`load_settings`); everything else receives the resulting `Settings`.
This is the only module that reads the environment.
"""

from __future__ import annotations

import os
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


class RetrievalSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    embedding_model: str = "all-minilm-l6-v2"
    """Embedding model (id or alias) that collections are built with."""
    answer_model: str | None = None
    """Model for grounded answers when a request names none; default: the first chat/completion model."""
    resume_on_start: bool = True
    """Re-ingest documents that a crash left half-ingested, once the server has started."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: Path = Path(platformdirs.user_data_dir("appliance", appauthor=False))
    """Where models and state live. Models are under DATA_DIR/models/<id>/."""
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    models: ModelSettings = msgspec.field(default_factory=ModelSettings)
    retrieval: RetrievalSettings = msgspec.field(default_factory=RetrievalSettings)

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
