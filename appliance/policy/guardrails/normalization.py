"""Text normalisation before injection rules: undo the usual obfuscations so one rule sees them all.

NFKC (full-width and styled letters to plain), invisible characters removed (zero-width, bidi
controls, Unicode tag characters), Cyrillic/Greek lookalikes mapped to Latin, letter-by-letter
spacing joined, hard-wrapped lines rejoined, whitespace collapsed (other line breaks kept as one
\\n: rules use them as sentence boundaries), casefolded. `variants` adds a leetspeak-decoded form.
"""

from __future__ import annotations

import re
import unicodedata

_INVISIBLE = dict.fromkeys(
    [
        0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0,
        *range(0x200B, 0x2010),  # zero-width space / joiners, LRM, RLM
        *range(0x202A, 0x202F),  # bidi embeddings and overrides
        *range(0x2060, 0x2065),  # word joiner, invisible operators
        *range(0x2066, 0x2070),  # bidi isolates, deprecated format characters
        *range(0xFE00, 0xFE10),  # variation selectors
    ],
    None,
)
_TAGS = re.compile("[\U000e0000-\U000e007f\U000e0100-\U000e01ef]")
"""Unicode tag characters (invisible ASCII look-alikes) and supplementary variation selectors."""

_HOMOGLYPHS = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w",
        "һ": "h", "ӏ": "l", "ɡ": "g", "ү": "y", "ց": "g", "ո": "n", "օ": "o",
        "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
        "Х": "X", "У": "Y", "І": "I", "Ј": "J", "Ѕ": "S", "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W", "Һ": "H", "Ӏ": "I",
        # Greek
        "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
        "χ": "x", "γ": "y", "ω": "w", "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K",
        "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
        # Latin lookalikes NFKC leaves alone
        "ı": "i", "ȷ": "j", "ʏ": "y", "ɪ": "i", "ʀ": "r", "ᴀ": "a", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e",
        "ᴏ": "o", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z",
    }
)
_SPACED_LETTERS = re.compile(r"[^\W\d_](?<![^\W\d_]{2})([ .\-_*])(?:[^\W\d_]\1)+[^\W\d_](?![^\W\d_])")
"""i g n o r e, i.g.n.o.r.e, i-g-n-o-r-e: three or more single letters, the same separator between each."""
_SPACED_HINT = re.compile(r"[ .\-_*][^\W\d_][ .\-_*][^\W\d_][ .\-_*]")
_OTHER_SPACES = re.compile("[\t\r\f\v\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_MULTIPLE_SPACES = re.compile(" {2,}")
_LINE_BREAKS = re.compile(r"\n[ \n]+")
_WRAPPED_LINE = re.compile(r"\n(?<=[a-z,;]\n)(?=[a-z])")
"""A line break inside a sentence (hard-wrapped prose): not a sentence boundary."""
_LEET_HINT = re.compile(r"[0-9$](?<=[a-z][0-9$])|[0-9$](?=[a-z])")
"""A digit or $ next to a letter; the word around it must have three letters or more ("1gn0re", "pa$$w0rd",
not "q2", "mp3" or "1st")."""
_LEET_WORD = re.compile(r"[a-z0-9$]+")
_LEET_CONTEXT = 120
"""Characters either side of such a word that go into the decoded variant."""
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "$": "s"})


_INVISIBLE_CHARS = re.compile("[" + "".join(re.escape(chr(c)) for c in _INVISIBLE) + "]")
_LOOKALIKES = re.compile("[" + "".join(re.escape(chr(c)) for c in _HOMOGLYPHS) + "]")


def normalize(text: str) -> str:
    """The text as the injection rules read it."""
    if not text.isascii():  # the common all-ASCII case skips the Unicode steps (str.translate is slow)
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
        if _INVISIBLE_CHARS.search(text):
            text = text.translate(_INVISIBLE)
        if _TAGS.search(text):
            text = _TAGS.sub("", text)
        if _LOOKALIKES.search(text):
            text = text.translate(_HOMOGLYPHS)
    # Each step is skipped when a cheap test shows it has nothing to do: most texts need few of them.
    if _SPACED_HINT.search(text):
        text = _join_spaced_letters(text)
    if _OTHER_SPACES.search(text):
        text = _OTHER_SPACES.sub(" ", text)
    if "  " in text:
        text = _MULTIPLE_SPACES.sub(" ", text)
    if "\n" in text:
        text = _WRAPPED_LINE.sub(" ", _LINE_BREAKS.sub("\n", text.replace(" \n", "\n")))
    return text.strip().casefold()


def _join_spaced_letters(text: str) -> str:
    out, pos = [], 0
    for hint in _SPACED_HINT.finditer(text):
        start = hint.start() + 1  # the first letter of the hint, or the one before it when that starts the run
        if start >= 2 and text[start - 2].isalpha() and (start < 3 or not text[start - 3].isalpha()):
            start -= 2
        if start < pos:
            continue
        m = _SPACED_LETTERS.match(text, start)
        if m:
            out.append(text[pos:m.start()])
            out.append(re.sub(r"[ .\-_*]", "", m.group()))
            pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def variants(text: str) -> list[str]:
    """normalize(text), plus the leetspeak-decoded form ("1gn0r3" -> "ignore") of its lines that have
    words mixing letters with digits or symbols."""
    base = normalize(text)
    windows: list[list[int]] = []
    for m in _LEET_HINT.finditer(base):
        word = _LEET_WORD.match(base, _word_start(base, m.start()))
        if word is None or sum(c.isalpha() for c in word.group()) < 3:
            continue
        start, end = max(0, m.start() - _LEET_CONTEXT), m.end() + _LEET_CONTEXT
        if windows and start <= windows[-1][1]:
            windows[-1][1] = end
        else:
            windows.append([start, end])
    if not windows:
        return [base]
    decoded = "\n".join(_LEET_WORD.sub(lambda m: m.group().translate(_LEET), base[a:b]) for a, b in windows)
    return [base, decoded]


_SCRIPT_SWITCH = re.compile(r"[^\x00-\x7f](?<=[A-Za-z][^\x00-\x7f])|[^\x00-\x7f](?=[A-Za-z])")
"""A non-ASCII character next to an ASCII letter."""
_WORD_AT = re.compile(r"[^\W\d_]+")


def _word_start(text: str, i: int) -> int:
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] == "$"):
        i -= 1
    return i


def has_mixed_script(text: str) -> bool:
    """A word mixing Latin letters with Cyrillic or Greek ones: a sign of homoglyph obfuscation."""
    if text.isascii():
        return False
    for hit in _SCRIPT_SWITCH.finditer(text):
        if not hit.group().isalpha():
            continue
        start = hit.start()
        while start > 0 and text[start - 1].isalpha():
            start -= 1
        word = _WORD_AT.match(text, start).group()  # type: ignore[union-attr]
        scripts = {_script(c) for c in word}
        if "latin" in scripts and len(scripts - {"other"}) > 1:
            return True
    return False


def _script(c: str) -> str:
    if c.isascii():
        return "latin"
    name = unicodedata.name(c, "")
    if name.startswith("CYRILLIC"):
        return "cyrillic"
    if name.startswith("GREEK"):
        return "greek"
    return "other"
