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
_ENTITY_HOLD_WORDS = 8
"""With named-entity kinds on: words always held back, the right context spaCy's NER needs to decide on a
name (its features reach 4 tokens either side) and long enough for multi-word names and addresses."""
_ENTITY_BATCH_WORDS = 8
"""...and words gathered beyond those before the detector runs again (NER once per ~8 words, not per token)."""
_NAME_PART = re.compile(r"[A-Z\d][\w'’.,-]*|(?:de|da|del|der|van|von|la|le|du|of|bin|al)")


def _name_part(token: str) -> bool:
    """Whether a token may continue a name, organisation or address ("Mary", "O'Neil", "van", "221B")."""
    return bool(_NAME_PART.fullmatch(token))


def _joinable(token: str) -> bool:
    """Whether a whitespace-separated token can be one part of a PII value that contains whitespace
    (card and IBAN groups, phone parts, national-id groups)."""
    if len(token) > _MAX_JOIN_TOKEN:
        return False
    return (
        any(c.isdigit() for c in token) or bool(_SHORT_CAPS.fullmatch(token))
        or bool(_PUNCT_ONLY.fullmatch(token)) or token.lower() in _EXTENSION_WORDS
    )


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
        if self._entities and not final and len(tokens) < _ENTITY_HOLD_WORDS + _ENTITY_BATCH_WORDS and n <= _SOFT_HOLD:
            return 0  # too few words after the last cut for the NER to judge them: wait, without running it
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
        if self._entities and len(tokens) > _ENTITY_HOLD_WORDS:
            i = len(tokens) - _ENTITY_HOLD_WORDS
            cut = min(cut, tokens[i][0])
            # Never between two words of what may be one name, organisation or address.
            while 0 < i < len(tokens) and cut == tokens[i][0] and _name_part(buf[slice(*tokens[i - 1])]) \
                    and _name_part(buf[slice(*tokens[i])]):
                i -= 1
                cut = tokens[i][0]
        pem = self._open_pem()
        if pem is not None:
            cut = min(cut, pem)
        spans = self._spans()
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

    def _spans(self) -> list[tuple[int, int]]:
        """Candidate and finding spans over the buffer (offsets into the buffer)."""
        text, k = self._ctx + self._buf, len(self._ctx)
        self._findings = self.detector.find(text, self.kinds)
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
