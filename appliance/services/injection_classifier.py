"""The guardrails' learned injection detector: a classifier model from the registry, behind the
`InjectionClassifier` seam (policy/ never sees engines).

The model loads in the background like any other. Until it is ready, and whenever it fails, `score`
answers None and the rules decide, so a slow or broken classifier never blocks a request.

By default the bundled classifiers screen user turns (gateway.injection_classifier = "injection-guard")
and retrieved content (gateway.retrieved_injection_classifier = "injection-guard-indirect"). A data
directory where they are not installed yet (`appliance models install-defaults`) gets the rules with
a warning; a model the operator named that is missing is an error.
"""

from __future__ import annotations

import logging

from appliance.engines.registry import ClassifierEngine, ModelRegistry
from appliance.errors import ApplianceError, SettingsError
from appliance.modelstore.manifest import Manifest
from appliance.settings import GatewaySettings

log = logging.getLogger(__name__)


class RegistryInjectionClassifier:
    """P(injection label) of a text from the registry's classifier engine; None while it is not loaded."""

    def __init__(self, registry: ModelRegistry, manifest: Manifest, label: str) -> None:
        self._registry = registry
        self.manifest = manifest
        self.label = label
        self._warned = False

    def score(self, text: str) -> float | None:
        scores = self.scores([text])
        return None if scores is None else scores[0]

    def scores(self, texts: list[str]) -> list[float] | None:
        """P(label) of each text, in one engine call; None while the model is not loaded."""
        lease = self._registry.try_acquire(self.manifest)
        if lease is None:
            return None
        try:
            engine: ClassifierEngine = lease.engine
            return [p[self.label] for p in engine.probabilities(texts)]
        except ApplianceError as exc:
            if not self._warned:  # once: a broken model would otherwise log on every request
                self._warned = True
                log.warning("injection classifier %s failed (%s): the rules decide", self.manifest.id, exc.message)
            return None
        finally:
            lease.release()


def classifier_manifest(manifests: list[Manifest], name: str, label: str) -> Manifest:
    """The manifest of classifier `name`, checked: it exists, is a classifier and has `label`."""
    manifest = next((m for m in manifests if name in m.names()), None)
    if manifest is None:
        raise SettingsError(
            f"no model named {name!r} is registered (import one with `appliance models import MODEL.onnx "
            "--kind classifier --tokenizer tokenizer.json --label SAFE --label INJECTION`)"
        )
    if manifest.kind != "classifier":
        raise SettingsError(f"model {manifest.id!r} is a {manifest.kind} model, not a classifier")
    if label not in (manifest.labels or []):
        raise SettingsError(
            f"{label!r} is not a label of {manifest.id!r} (its labels: {', '.join(manifest.labels or [])}); "
            "set gateway.injection_label to the one that means injection"
        )
    return manifest


BUNDLED = {"injection-guard", "injection-guard-indirect"}
"""The default classifiers of the catalogue (models/): absent from a data directory, they leave the rules."""


def injection_classifier(
    settings: GatewaySettings, registry: ModelRegistry, *, retrieved: bool = False,
) -> RegistryInjectionClassifier | None:
    """The configured classifier over `registry` for user turns (or, `retrieved`, for retrieved content),
    or None (rules only). Raises SettingsError when the setting names a model that is missing (other
    than a bundled default not installed yet), not a classifier, or without the injection label."""
    field = "retrieved_injection_classifier" if retrieved else "injection_classifier"
    name = settings.retrieved_injection_classifier if retrieved else settings.injection_classifier
    if not name:
        return None
    manifests = registry.manifests()
    if name in BUNDLED and not any(name in m.names() for m in manifests):
        log.warning("%s: the bundled %s is not installed (appliance models install-defaults): the rules decide",
                    field, name)
        return None
    label = settings.injection_label if name not in BUNDLED else "INJECTION"
    try:
        manifest = classifier_manifest(manifests, name, label)
    except SettingsError as exc:
        raise SettingsError(f"gateway.{field}: {exc.message}") from None
    return RegistryInjectionClassifier(registry, manifest, label)
