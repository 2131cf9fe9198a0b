"""The model manifest: one TOML file per model, beside the model's files in DATA_DIR/models/<id>/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from appliance.errors import ModelStoreError
from appliance.types import AdapterRef, Sampling

ModelKind = Literal["chat", "completion", "embedding", "rerank", "classifier", "adapter"]
ModelFormat = Literal["gguf", "onnx"]
MANIFEST_NAME = "manifest.toml"
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ModelId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class FileSource(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Where a bundled file comes from: an installed registry package or the catalogue folder itself,
    never a network hub."""

    package: str = ""
    """Distribution name to install (pip), for the operator's error messages."""
    module: str = ""
    """Importable module of that package."""
    bundled: str | None = None
    """Instead of a package: a file shipped in the catalogue folder (models/), e.g. "injection-guard/model.onnx"."""
    assemble: bool = False
    """The module's `assemble(output_path)` writes the file (chunked packages)."""
    resource: str | None = None
    """A file inside the module's directory."""
    zip_member: str | None = None
    """With `resource` naming a zip archive: the member to extract."""


class ModelFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    name: str
    """File name inside the model's directory."""
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(ge=1)]
    source: FileSource | None = None


class Manifest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    id: ModelId
    kind: ModelKind
    format: ModelFormat
    file: ModelFile
    tokenizer: ModelFile | None = None
    """HF tokenizer.json for ONNX models."""
    aliases: list[ModelId] = []
    description: str = ""
    context_length: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Trained context of the model (GGUF metadata) or the encoder's maximum sequence length."""
    embedding_dim: Annotated[int, msgspec.Meta(ge=1)] | None = None
    labels: list[str] | None = None
    """For kind = classifier: the name of each output column (logit), in order, e.g. ["SAFE", "INJECTION"]."""
    architecture: str | None = None
    chat_template: str | None = None
    """Jinja template turning `messages` into a prompt; required for kind = chat."""
    stop: list[str] = []
    """Stop strings always applied (e.g. the end-of-turn marker of the chat template)."""
    instruction_tuned: bool = True
    """False for base models: grounded answers then use a completion-style prompt, not the chat template."""
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    gpu_layers: Literal["auto"] | Annotated[int, msgspec.Meta(ge=-1)] = "auto"
    """Layers to offload: "auto" = all when a GPU backend is present, else 0."""
    created: int = 0
    """Unix time the model was registered."""
    speculation: Literal["off", "grounded", "all"] | None = None
    """Which of this model's requests speculate by default (settings `models.speculation` when unset)."""
    base: ModelId | None = None
    """For kind = adapter: the id of the model the LoRA adapter was made for."""
    adapter: AdapterRef | None = None
    """Never in a manifest file: set on the manifest the registry makes for `BASE:ADAPTER`, the base model
    served with that adapter (its id is `BASE:ADAPTER`, `base` the base model's id)."""

    @property
    def engine_id(self) -> str:
        """The model whose engine serves this manifest: the base model's for an adapted one."""
        return self.base if self.adapter is not None and self.base else self.id

    def files(self) -> list[ModelFile]:
        return [f for f in (self.file, self.tokenizer) if f is not None]

    def names(self) -> list[str]:
        return [self.id, *self.aliases]

    def context_window(self, n_ctx: int | None) -> int | None:
        """Tokens one request can use: a generative model's trained context capped at the
        server's per-sequence `n_ctx`; an encoder's maximum sequence length (256 when unknown)."""
        if self.kind in ("chat", "completion"):
            if n_ctx is None:
                return self.context_length
            return min(n_ctx, self.context_length or n_ctx)
        return self.context_length or 256


def check_model_id(model_id: str) -> str:
    if not _ID_RE.match(model_id) or model_id in {".", ".."}:
        raise ModelStoreError(
            f"invalid model id {model_id!r}: use letters, digits, '.', '_', ':' or '-' (at most 128)",
            param="id",
        )
    return model_id


def check_file_name(name: str) -> str:
    """A manifest's file names must stay inside the model's own directory."""
    if not name or "/" in name or "\\" in name or name in {".", ".."} or name == MANIFEST_NAME:
        raise ModelStoreError(f"invalid file name in manifest: {name!r}")
    return name


def read_manifest(path: Path) -> Manifest:
    try:
        manifest = msgspec.toml.decode(path.read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError) as exc:
        raise ModelStoreError(f"invalid manifest {path}: {exc}") from None
    for f in manifest.files():
        check_file_name(f.name)
    if manifest.kind == "chat" and not manifest.chat_template:
        raise ModelStoreError(f"invalid manifest {path}: kind 'chat' needs a chat_template")
    if manifest.kind == "classifier" and (not manifest.labels or manifest.tokenizer is None):
        raise ModelStoreError(f"invalid manifest {path}: kind 'classifier' needs labels and a tokenizer")
    if manifest.kind == "adapter" and (manifest.base is None or manifest.format != "gguf"):
        raise ModelStoreError(f"invalid manifest {path}: kind 'adapter' needs a GGUF file and its base model")
    if manifest.adapter is not None:
        raise ModelStoreError(f"invalid manifest {path}: 'adapter' is set by the server, not in a manifest")
    return manifest


def write_manifest(manifest: Manifest, path: Path) -> None:
    path.write_bytes(msgspec.toml.encode(manifest))
