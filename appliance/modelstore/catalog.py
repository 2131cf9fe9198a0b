"""The catalogue of bundled default models: the TOML manifests in the repository's models/ folder.

The same folder sits beside the `appliance` package in a source checkout and inside the PyInstaller
bundle (the spec copies it), so one path works for both.
"""

from __future__ import annotations

from pathlib import Path

from appliance.modelstore.manifest import Manifest, read_manifest

CATALOG_DIR = Path(__file__).resolve().parents[2] / "models"


def catalog_manifests(catalog_dir: Path = CATALOG_DIR) -> list[Manifest]:
    return [read_manifest(p) for p in sorted(catalog_dir.glob("*.toml"))]
