"""Masking: each finding becomes a placeholder like [EMAIL_1]; the same value keeps the same placeholder.

`StreamMasker` masks generated text chunk by chunk and gives exactly what `mask` gives for the whole
text, also when a card number or an email arrives split over several chunks.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter

from appliance.policy.guardrails.pii import ENTITY_KINDS, PiiDetector, candidate_spans
from appliance.policy.guardrails.types import GuardrailAction, MaskResult, PiiFinding, Stage

_DIGIT_KINDS = frozenset({"credit_card", "us_ssn", "phone", "fr_nir", "de_idnr"})
_COMPACT_KINDS = frozenset({"iban", "uk_nino", "es_dni", "it_fiscal_code"})
_PLACEHOLDER = re.compile(r"\[[A-Z_]+_\d+\]")


def _value_key(kind: str, value: str) -> str:
    """Spellings of one value that should share a placeholder ("4111 1111..." and "4111-1111...")."""
    if kind in _DIGIT_KINDS:
        return "".join(c for c in value if c.isdigit())
    if kind in _COMPACT_KINDS:
        return re.sub(r"[\s-]", "", value).upper()
    if kind == "email" or kind in ENTITY_KINDS:
        return " ".join(value.split()).casefold()
    if kind == "ip_address":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value


class MaskSession:
    """Placeholder numbering shared by every text masked in one conversation or stream."""

    def __init__(self, *, reversible: bool = False) -> None:
        self._placeholders: dict[tuple[str, str], str] = {}
        self._next: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        """Findings per kind masked so far (occurrences, not distinct values)."""
        self.mapping: dict[str, str] | None = {} if reversible else None
        """{placeholder: original}, only for a reversible session."""

    def placeholder(self, kind: str, value: str) -> str:
        key = (kind, _value_key(kind, value))
        found = self._placeholders.get(key)
        if found is None:
            self._next[kind] += 1
            found = self._placeholders[key] = f"[{kind.upper()}_{self._next[kind]}]"
            if self.mapping is not None:
                self.mapping[found] = value
        return found

    def apply(self, text: str, findings: list[PiiFinding] | tuple[PiiFinding, ...]) -> str:
        """text with each (non-overlapping, sorted) finding replaced by its placeholder."""
        out, pos = [], 0
        for f in findings:
            out.append(text[pos:f.start])
            out.append(self.placeholder(f.kind, text[f.start:f.end]))
            self.counts[f.kind] += 1
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    def actions(self, stage: Stage, action: str) -> list[GuardrailAction]:
        return [GuardrailAction(stage=stage, kind=k, action=action, count=n)  # type: ignore[arg-type]
                for k, n in sorted(self.counts.items())]


def mask(
    text: str, detector: PiiDetector | None = None, *, reversible: bool = False, session: MaskSession | None = None
) -> MaskResult:
    """Replace PII and secrets in text with placeholders. The map back is returned only if reversible
    (or the given session is)."""
    detector = detector or PiiDetector()
    session = session or MaskSession(reversible=reversible)
    findings = detector.find(text)
    masked = session.apply(text, findings)
    mapping = dict(session.mapping) if session.mapping is not None else None
    return MaskResult(text=masked, findings=tuple(findings), mapping=mapping)


@functools.cache
def _default_detector() -> PiiDetector:
    return PiiDetector()


def redact_text(text: str) -> str:
    """text with its PII and secrets masked by a default detector (for log lines and error messages)."""
    return mask(text, _default_detector()).text


def unmask(text: str, mapping: dict[str, str]) -> str:
    """Put the originals back for every placeholder in mapping (for a reversible mask)."""
    return _PLACEHOLDER.sub(lambda m: mapping.get(m.group(), m.group()), text)


_TOKEN = re.compile(r"\S+")
_SHORT_CAPS = re.compile(r"[A-Z]{1,4}[.,;:]?")
_PUNCT_ONLY = re.compile(r"[()\[\].\-/+#\u2013:]+")
_EXTENSION_WORDS = frozenset({"ext", "ext.", "extn", "extn.", "x", "tel", "tel:", "phone:", "fax:"})
_PEM_OPEN = re.compile(r"-----BEGIN ")
_PEM_CLOSE = re.compile(r"-----END [^\n]*?-----")
_MAX_JOIN_TOKEN = 40
_CONTEXT_CHARS = 128
"""Raw text kept from what was emitted, for rules that look back (SSN keyword, `api_key =` ...)."""
_SOFT_HOLD = 1024
"""A run of number-like tokens longer than this is cut where no candidate is, at least _SAFE_TAIL back."""
_SAFE_TAIL = 96
_HARD_HOLD = 16384
"""Most text held back in any case (an unterminated private key block, one enormous token)."""
_ENTITY_HOLD_WORDS = 6
"""With named-entity kinds on, a name-like word (capitalised, or a number) is held back until this many
words follow it: spaCy's NER decides on a word from ~4 tokens on either side. A run of name-like words
(a multi-word name, an organisation, an address) is held back whole."""
_NAME_PART = re.compile(r"[A-Z][\w'’.,-]*|(?:de|da|del|der|van|von|la|le|du|of|the|and|&|bin|al)")


def _name_part(token: str) -> bool:
    """Whether a token may be part of a name, organisation, address or date ("Mary", "O'Neil", "van",
    "221B", "07/05/1941")."""
    return bool(_NAME_PART.fullmatch(token)) or any(c.isdigit() for c in token)


def _joinable(token: str) -> bool:
    """Whether a whitespace-separated token can be one part of a PII value that contains whitespace
    (card and IBAN groups, phone parts, national-id groups)."""
    if len(token) > _MAX_JOIN_TOKEN:
        return False
    return (
        any(c.isdigit() for c in token) or bool(_SHORT_CAPS.fullmatch(token))
        or bool(_PUNCT_ONLY.fullmatch(token)) or token.lower() in _EXTENSION_WORDS
    )


def _entity_limit(buf: str, tokens: list[tuple[int, int]], cut: int) -> int:
    """cut moved back before the first name-like word with fewer than _ENTITY_HOLD_WORDS words after it,
    then off any run of name-like words it would split."""
    n = len(tokens)
    for i in range(max(0, n - _ENTITY_HOLD_WORDS), n):
        if tokens[i][0] >= cut:
            break
        if _name_part(buf[tokens[i][0]:tokens[i][1]]):
            cut = tokens[i][0]
            break
    i = next((j for j, (start, _) in enumerate(tokens) if start == cut), 0)
    while i > 0 and _name_part(buf[tokens[i - 1][0]:tokens[i - 1][1]]) and _name_part(buf[tokens[i][0]:tokens[i][1]]):
        i -= 1
        cut = tokens[i][0]
    return cut


class StreamMasker:
    """Masks text that arrives in pieces. `feed` returns what is safe to emit now, `flush` the rest.

    Text is held back only while it could still be part of a value: the last (possibly incomplete)
    word, a trailing run of number-like groups, an open private-key block. The concatenated output
    equals `mask(whole_text)`. With mask_output=False the text passes unchanged and only counts are kept.
    """

    def __init__(
        self, detector: PiiDetector | None = None, *, session: MaskSession | None = None, mask_output: bool = True,
        kinds: frozenset[str] | None = None,
    ) -> None:
        """`kinds`: the PII kinds to mask (default: all of the detector's)."""
        self.detector = detector or PiiDetector()
        self.kinds = self.detector.kinds if kinds is None else kinds & self.detector.kinds
        self._entities = self.detector.entities is not None and bool(self.kinds & set(ENTITY_KINDS))
        self.session = session or MaskSession()
        self.mask_output = mask_output
        self._buf = ""
        self._ctx = ""

    @property
    def counts(self) -> Counter[str]:
        return self.session.counts

    @property
    def mapping(self) -> dict[str, str] | None:
        return self.session.mapping

    def actions(self) -> list[GuardrailAction]:
        """Audit lines for the output so far: kinds and counts."""
        return self.session.actions("output", "mask" if self.mask_output else "flag")

    def feed(self, text: str) -> str:
        if not text:
            return ""
        self._buf += text
        out = self._emit(self._cut(final=False))
        return out if self.mask_output else text

    def flush(self) -> str:
        out = self._emit(len(self._buf), final=True) if self._buf else ""
        return out if self.mask_output else ""

    def _cut(self, *, final: bool) -> int:
        buf, n = self._buf, len(self._buf)
        tokens = [m.span() for m in _TOKEN.finditer(buf)]
        if not tokens:
            return 0  # only whitespace: the next token may still join the one before it
        trailing_space = buf[-1].isspace()
        # Largest token boundary where the tokens on both sides cannot be parts of one value.
        cut = 0
        boundaries = [(tokens[i][0], i) for i in range(1, len(tokens))]
        if trailing_space:
            boundaries.append((n, len(tokens)))
        for pos, i in reversed(boundaries):
            before = buf[tokens[i - 1][0]:tokens[i - 1][1]]
            if i == len(tokens):
                after_may_join = True  # the next token is unknown
            else:
                after = buf[tokens[i][0]:tokens[i][1]]
                incomplete = i == len(tokens) - 1 and not trailing_space
                after_may_join = len(after) <= _MAX_JOIN_TOKEN if incomplete else _joinable(after)
            if not (_joinable(before) and after_may_join):
                cut = pos
                break
        if self._entities:
            cut = _entity_limit(buf, tokens, cut)
        pem = self._open_pem()
        if pem is not None:
            cut = min(cut, pem)
        if cut == 0 and n <= _SOFT_HOLD:
            return 0
        # The NER runs only when what may be emitted holds a name-like word (else it cannot hold an entity).
        entities = self._entities and (
            n - cut > _SOFT_HOLD or any(_name_part(buf[a:b]) for a, b in tokens if b <= cut)
        )
        spans = self._spans(entities)
        cut = self._outside(cut, spans)
        if n - cut > _SOFT_HOLD and pem is None:
            # A long run of number-like tokens: cut at a token start far from the end and outside candidates.
            for start, _ in reversed(tokens):
                if start <= n - _SAFE_TAIL and start > cut and self._outside(start, spans) == start:
                    cut = start
                    break
        if n - cut > _HARD_HOLD:
            cut = tokens[-1][0] if not trailing_space else n
        return cut

    def _open_pem(self) -> int | None:
        """Start of a private-key block that began in the buffer and has not ended yet."""
        begin = None
        for m in _PEM_OPEN.finditer(self._buf):
            begin = m.start()
        if begin is not None and _PEM_CLOSE.search(self._buf, begin):
            return None
        return begin

    def _spans(self, entities: bool) -> list[tuple[int, int]]:
        """Candidate and finding spans over the buffer (offsets into the buffer); the named-entity kinds
        only if `entities`."""
        text, k = self._ctx + self._buf, len(self._ctx)
        self._findings = self.detector.find(text, self.kinds if entities else self.kinds - set(ENTITY_KINDS))
        spans = candidate_spans(text) + [(f.start, f.end) for f in self._findings]
        return [(s - k, e - k) for s, e in spans if e > k]

    @staticmethod
    def _outside(cut: int, spans: list[tuple[int, int]]) -> int:
        """cut moved back until no span strictly contains it."""
        moved = True
        while moved and cut > 0:
            moved = False
            for s, e in spans:
                if s < cut < e:
                    cut, moved = max(s, 0), True
        return cut

    def _emit(self, cut: int, *, final: bool = False) -> str:
        if cut <= 0:
            return ""
        k = len(self._ctx)
        if final:
            self._findings = self.detector.find(self._ctx + self._buf, self.kinds)
        segment = self._buf[:cut]
        findings = [PiiFinding(f.kind, f.start - k, f.end - k) for f in self._findings if f.start >= k and f.end <= k + cut]
        out = self.session.apply(segment, findings)
        self._ctx = (self._ctx + segment)[-_CONTEXT_CHARS:]
        self._buf = self._buf[cut:]
        return out
