"""Gates for regex rules: what every match of a pattern must contain, derived from the pattern itself.

A rule's regex is the expensive part of a guardrail; its gate is a cheap necessary condition checked
first. The gate is read off the pattern's parse tree (Python's own regex parser), so it can be weaker
than the pattern but never disagree with it: a text the gate turns away has no match.

A gate is a conjunction of clauses. A clause holds words (whole tokens of the text, `TOKEN` runs,
checked against the text's token set) and substrings (checked with `in`); a text satisfies a clause
when it has one of the words or contains one of the substrings. A literal run of the pattern counts
as a word only where the pattern puts a non-token character, `\\b`, `^` or `$` on both sides of it:
`\\bignore\\W` makes the word "ignore", but `jailbr(?:eak|oken)\\w*` only the substrings "jailbreak"
and "jailbroken" (a match may hold the token "jailbreaking").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from re import _constants as sre  # type: ignore[attr-defined]  # the parser's opcodes; stable since 3.11
from re import _parser  # type: ignore[attr-defined]
from typing import Any, NamedTuple

TOKEN = re.compile(r"[a-z0-9]+")
"""A word of the (casefolded) text, as gates count words."""
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def tokens(text: str) -> frozenset[str]:
    """The text's words, for `Gate.admits`."""
    return frozenset(TOKEN.findall(text))


class Clause(NamedTuple):
    """Satisfied by a text that has one of `words` or contains one of `substrings`."""

    words: frozenset[str]
    substrings: frozenset[str] = frozenset()

    def union(self, other: Clause) -> Clause:
        return Clause(self.words | other.words, self.substrings | other.substrings)

    def cost(self) -> float:
        """Roughly how often a text satisfies the clause (and what checking it costs)."""
        return _clause_cost(self)

    def implies(self, other: Clause) -> bool:
        """Whether every text satisfying this clause satisfies `other` (so `other` adds nothing)."""
        return all(w in other.words or any(s in w for s in other.substrings) for w in self.words) and all(
            any(s in mine for s in other.substrings) for mine in self.substrings
        )


@dataclass(frozen=True, slots=True)
class Gate:
    clauses: tuple[Clause, ...] = ()

    def admits(self, words: frozenset[str], text: str) -> bool:
        """Whether `text` (whose `tokens` are `words`) may match the pattern the gate was derived from."""
        for clause in self.clauses:
            if clause.words.isdisjoint(words) and not any(s in text for s in clause.substrings):
                return False
        return True

    def __bool__(self) -> bool:
        return bool(self.clauses)


MAX_CLAUSES = 4
"""Clauses kept per gate: the most selective ones."""
_COMMON = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been am do does did have has "
    "had will would can could shall should may might must not no yes you your i me my we our us it its this "
    "that these those he she they them their there here what which who when where why how all any some so "
    "then than too very just only also now up out one".split()
)
"""Words most English texts hold: a clause of them lets nearly everything through."""


@functools.lru_cache(maxsize=8192)
def _clause_cost(c: Clause) -> float:
    return sum(map(_word_cost, c.words)) + sum(map(_substring_cost, c.substrings))


@functools.lru_cache(maxsize=8192)
def _word_cost(word: str) -> float:
    if word in _COMMON or len(word) == 1:
        return 20.0
    return 6.0 if len(word) == 2 else 3.0 if len(word) <= 4 else 1.5 if len(word) <= 6 else 1.0


@functools.lru_cache(maxsize=8192)
def _substring_cost(substring: str) -> float:
    # `in` costs more than a set lookup, but "os.system" or "you are now" is rarer than its words.
    phrase = TOKEN.fullmatch(substring) is None
    return 1.0 + _word_cost(substring) * (0.5 if phrase else 1.0)


def derive_gate(pattern: str, flags: int = 0, *, opener: str | None = None, adjacent: bool = False) -> Gate:
    """The gate of `pattern`: one that admits everything where nothing is certain, or where the pattern
    uses what the derivation does not model (case-insensitive matching, back-references).

    `opener`: a pattern a counted match also needs before it, matched from a position just after a
    non-token character (or the text's start) up to the match's start (`adjacent`) or to a point
    before it. It is matched with that point as the end of the text, so an assertion at its end
    (`\\b`, `$`) says nothing about the text beyond and is left out.
    """
    if opener is not None:
        pattern = f"({opener})" + ("" if adjacent else r"[\s\S]*") + f"(?:{pattern})"
    tree = _parser.parse(pattern, flags)
    if tree.state.flags & re.IGNORECASE:
        return Gate()
    derivation = _Derivation()
    try:
        items = list(tree)
        if opener is not None:
            op, (group, add_flags, del_flags, body) = items[0]
            items[0] = (op, (group, add_flags, del_flags, derivation.open_end(body)))
        clauses = derivation.require(items, left=opener is not None, right=False)
    except _Unsupported:
        return Gate()
    return Gate(tuple(_prune(clauses)))


# -- the derivation ---------------------------------------------------------------------------------
# A node that matches a small finite set of strings is expanded into them. In those strings a literal
# character stands for itself and three marker characters stand for the rest: whatever only matters
# as "characters that are (or may be) token characters" collapses into one marker, so `\w+`, `\s*`
# and `[^.!?]{0,60}` expand to one or two strings. Larger nodes are walked as they are.

_SEP = "\x00"
"""One or more characters, none of them a token character."""
_ANY = "\x01"
"""One or more characters that may be token characters."""
_EDGE = "\x02"
"""\\b, ^ or $: the character beside it, next to a token character, is not one."""
_MARKERS = _SEP + _ANY + _EDGE
_RUN = re.compile(f"[^{_MARKERS}]+")
_PUNCTUATED = re.compile(r"[^a-z0-9\s]")

Strings = frozenset[str]
LIMIT = 256
"""Most strings a node expands to; a larger one is walked instead (its words may go uncertified)."""
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)
_NO_TOKEN_CHAR = {
    sre.CATEGORY_NOT_WORD, sre.CATEGORY_SPACE, sre.CATEGORY_UNI_NOT_WORD, sre.CATEGORY_UNI_SPACE,
    sre.CATEGORY_LINEBREAK, sre.CATEGORY_UNI_LINEBREAK,
}
_DIGITS = {sre.CATEGORY_DIGIT, sre.CATEGORY_UNI_DIGIT}
_NOT_DIGITS = {sre.CATEGORY_NOT_DIGIT, sre.CATEGORY_UNI_NOT_DIGIT}
_EMPTY: Strings = frozenset({""})


class _Unsupported(Exception):
    pass


class _Edge(NamedTuple):
    """What a node puts at one of its ends, as the token beside it sees it."""

    nullable: bool
    """The node may match the empty string (look past it)."""
    certain: bool
    """When it does not, the character at that end is not a token character."""


def _literal(code: int) -> str:
    ch = chr(code)
    return _SEP if ch in _MARKERS else ch


def _kind(ch: str) -> str:
    """The marker a character counts as: _ANY for a token character, _SEP for any other; markers stay."""
    if ch in _MARKERS:
        return ch
    return _ANY if ch in _TOKEN_CHARS else _SEP


def _concat(a: str, b: str) -> str:
    if a and b and a[-1] == b[0] and a[-1] in _MARKERS:
        return a + b[1:]  # two runs of the same marker are one run
    return a + b


def _product(a: Strings, b: Strings) -> Strings:
    return frozenset(_concat(x, y) for x in a for y in b)


def _edge_of_strings(strings: Strings, end: int) -> _Edge:
    return _Edge(
        nullable="" in strings,
        certain=all(_kind(s[end]) != _ANY for s in strings if s),
    )


def _class_may_hold_token_char(items: list[tuple[Any, Any]]) -> bool:
    return any(_in_class(items, ch) for ch in _TOKEN_CHARS)


def _in_class(items: list[tuple[Any, Any]], ch: str) -> bool:
    negate, found = False, False
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            found = found or chr(av) == ch
        elif op is sre.RANGE:
            found = found or av[0] <= ord(ch) <= av[1]
        elif op is sre.CATEGORY and (av in _DIGITS or av in _NOT_DIGITS):
            found = found or ch.isdigit() == (av in _DIGITS)
        elif not (op is sre.CATEGORY and av in _NO_TOKEN_CHAR):
            return True  # \w, \S and whatever is not modelled here: it may hold the character
    return found != negate


class _Derivation:
    def __init__(self) -> None:
        self._finite: dict[int, tuple[tuple[Any, Any], Strings | None]] = {}
        """By id of the node, with the node itself (kept alive, so its id is not reused)."""

    # -- finite expansion --------------------------------------------------------------------------

    def finite(self, item: tuple[Any, Any]) -> Strings | None:
        key = id(item)
        if key not in self._finite:
            self._finite[key] = (item, self._expand(item))
        return self._finite[key][1]

    def finite_seq(self, items: Sequence[tuple[Any, Any]]) -> Strings | None:
        result = _EMPTY
        for item in items:
            if item[0] is sre.LITERAL:  # the common case, without a set product
                ch = _literal(item[1])
                result = frozenset(_concat(s, ch) for s in result)
                continue
            strings = self.finite(item)
            if strings is None or len(result) * len(strings) > LIMIT:
                return None
            result = _product(result, strings)
        return result

    def _expand(self, item: tuple[Any, Any]) -> Strings | None:
        op, av = item
        if op is sre.LITERAL:
            return frozenset({_literal(av)})
        if op is sre.NOT_LITERAL or op is sre.ANY:
            return frozenset({_ANY})
        if op is sre.IN:
            if len(av) <= 8 and all(o is sre.LITERAL for o, _ in av):
                return frozenset(_literal(c) for _, c in av)
            return frozenset({_ANY if _class_may_hold_token_char(av) else _SEP})
        if op is sre.AT:
            return _EMPTY if av is sre.AT_NON_BOUNDARY else frozenset({_EDGE})
        if op is sre.ASSERT or op is sre.ASSERT_NOT:
            return _EMPTY  # zero width: what matters is around it
        if op is sre.SUBPATTERN:
            if av[1] & re.IGNORECASE:
                raise _Unsupported(item)
            return self.finite_seq(av[-1])
        if op is sre.ATOMIC_GROUP:
            return self.finite_seq(av)
        if op is sre.BRANCH:
            union: set[str] = set()
            for branch in av[1]:
                strings = self.finite_seq(branch)
                if strings is None:
                    return None
                union |= strings
                if len(union) > LIMIT:
                    return None
            return frozenset(union)
        if op in _REPEATS:
            return self._expand_repeat(*av)
        raise _Unsupported(op)

    def _expand_repeat(self, low: int, high: int, body: Sequence[tuple[Any, Any]]) -> Strings | None:
        strings = self.finite_seq(body)
        if strings is None:
            return None
        if high is not sre.MAXREPEAT and high <= 4 and sum(len(strings) ** k for k in range(low, high + 1)) <= LIMIT:
            result: set[str] = set()
            power = _EMPTY
            for k in range(high + 1):
                if k >= low:
                    result |= power
                power = _product(power, strings)
            return frozenset(result)
        if all(len(s) == 1 for s in strings):
            # A run of single characters: for words and substrings it is one marker, whatever its length.
            kinds = {_kind(s) for s in strings}
            marker = _ANY if _ANY in kinds else min(kinds)
            return frozenset({marker, ""} if low == 0 else {marker})
        return None

    # -- the ends of a node ------------------------------------------------------------------------

    def edge(self, item: tuple[Any, Any], end: int) -> _Edge:
        strings = self.finite(item)
        if strings is not None:
            return _edge_of_strings(strings, end)
        op, av = item
        if op is sre.SUBPATTERN:
            return self.edge_seq(av[-1], end)
        if op is sre.ATOMIC_GROUP:
            return self.edge_seq(av, end)
        if op is sre.BRANCH:
            edges = [self.edge_seq(b, end) for b in av[1]]
            return _Edge(any(e.nullable for e in edges), all(e.certain for e in edges))
        if op in _REPEATS:
            inner = self.edge_seq(av[2], end)
            return _Edge(inner.nullable or av[0] == 0, inner.certain)
        raise _Unsupported(op)

    def edge_seq(self, items: Sequence[tuple[Any, Any]], end: int) -> _Edge:
        certain = True
        for item in items if end == 0 else reversed(items):
            e = self.edge(item, end)
            certain = certain and e.certain
            if not e.nullable:
                return _Edge(False, certain)
        return _Edge(True, certain)

    def open_end(self, items: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """`items` without the zero-width assertions that can fall at its end: a wider pattern, so what
        it must contain still holds."""
        result = list(items)
        for i in range(len(result) - 1, -1, -1):
            op, av = result[i]
            if op is sre.AT or op is sre.ASSERT or op is sre.ASSERT_NOT:
                del result[i]
                continue
            if op is sre.SUBPATTERN:
                result[i] = (op, (*av[:-1], self.open_end(av[-1])))
            elif op is sre.ATOMIC_GROUP:
                result[i] = (op, self.open_end(av))
            elif op is sre.BRANCH:
                result[i] = (op, (av[0], [self.open_end(b) for b in av[1]]))
            elif op in _REPEATS:
                result[i] = (op, (av[0], av[1], self.open_end(av[2])))
            if not self.edge(result[i], -1).nullable:
                break
        return result

    # -- what a match must contain -----------------------------------------------------------------

    def require(self, items: Sequence[tuple[Any, Any]], *, left: bool, right: bool) -> list[Clause]:
        """Clauses every match of the sequence `items` satisfies; `left`/`right`: whether the characters
        just outside it are known not to be token characters."""
        parts: list[Strings | tuple[Any, Any]] = []  # stretches of expanded nodes, and nodes walked
        for item in items:
            strings = self.finite(item)
            if strings is None:
                parts.append(item)
            elif parts and isinstance(parts[-1], frozenset) and len(parts[-1]) * len(strings) <= LIMIT:
                parts[-1] = _product(parts[-1], strings)
            else:
                parts.append(strings)
        edges = [
            (_edge_of_strings(p, 0), _edge_of_strings(p, -1)) if isinstance(p, frozenset)
            else (self.edge(p, 0), self.edge(p, -1))
            for p in parts
        ]
        clauses: list[Clause] = []
        for i, part in enumerate(parts):
            before = _outside(left, (edges[j][1] for j in range(i - 1, -1, -1)))
            after = _outside(right, (edges[j][0] for j in range(i + 1, len(parts))))
            if isinstance(part, frozenset):
                clauses += _any_of([_string_clauses(s, before, after) for s in sorted(part)])
            else:
                clauses += self._require_node(part, before, after)
        return clauses

    def _require_node(self, item: tuple[Any, Any], left: bool, right: bool) -> list[Clause]:
        op, av = item
        if op is sre.SUBPATTERN:
            return self.require(av[-1], left=left, right=right)
        if op is sre.ATOMIC_GROUP:
            return self.require(av, left=left, right=right)
        if op is sre.BRANCH:
            return _any_of([self.require(b, left=left, right=right) for b in av[1]])
        if op in _REPEATS:
            low, high, body = av
            if low == 0:
                return []
            if high != 1:  # a later repetition's neighbour is the body's own other end
                start, end = self.edge_seq(body, 0), self.edge_seq(body, -1)
                left = left and end.certain and not end.nullable
                right = right and start.certain and not start.nullable
            return self.require(body, left=left, right=right)
        return []


def _outside(default: bool, edges: Iterable[_Edge]) -> bool:
    """Whether the character beyond the nodes with these ends (nearest first) is not a token character."""
    for e in edges:
        if not e.certain:
            return False
        if not e.nullable:
            return True
    return default


@functools.lru_cache(maxsize=8192)
def _string_clauses(s: str, left: bool, right: bool) -> list[Clause]:
    """A clause per certain word of each literal run of `s`; one for the run itself where it has no
    such word or holds punctuation."""
    clauses: list[Clause] = []
    for run in _RUN.finditer(s):
        i, j = run.span()
        before = left if i == 0 else s[i - 1] != _ANY
        after = right if j == len(s) else s[j] != _ANY
        text = run.group()
        words = [
            m.group() for m in TOKEN.finditer(text)
            if (m.start() > 0 or before) and (m.end() < len(text) or after)
        ]
        clauses += [Clause(frozenset({w})) for w in dict.fromkeys(words)]
        literal = text.strip()
        if literal and (not words or _PUNCTUATED.search(literal)):  # "os.system" is rarer than "os" or "system"
            clauses.append(Clause(frozenset(), frozenset({literal})))
    return clauses


def _any_of(alternatives: list[list[Clause]]) -> list[Clause]:
    """Clauses that hold whichever alternative matched: unions of one clause from each."""
    if not alternatives or any(not a for a in alternatives):
        return []
    if len(alternatives) == 1:
        return alternatives[0]
    candidates = [
        _union(a[0] for a in alternatives),
        _union(a[-1] for a in alternatives),
        _union(min(a, key=_rank) for a in alternatives),
    ]
    # Grow from each clause of the first alternative, taking from each other one the clause that adds
    # least: the words in the same place of every alternative ("instructions" in "new instructions:",
    # "directives" in "real directives:") end up in one clause.
    for seed in alternatives[0]:
        union = seed
        for other in alternatives[1:]:
            union = union.union(min(other, key=lambda c: (_added_cost(c, union), c.cost())))
        candidates.append(union)
    return _prune(candidates)


def _added_cost(c: Clause, union: Clause) -> float:
    return sum(map(_word_cost, c.words - union.words)) + sum(map(_substring_cost, c.substrings - union.substrings))


def _union(clauses: Iterable[Clause]) -> Clause:
    words: set[str] = set()
    substrings: set[str] = set()
    for c in clauses:
        words |= c.words
        substrings |= c.substrings
    return Clause(frozenset(words), frozenset(substrings))


def _simplified(c: Clause) -> Clause:
    """Within a clause, "os.system(" adds nothing to "os.system", nor the word "jailbreak" to the substring."""
    kept = [s for s in c.substrings if not any(t in s and t != s for t in c.substrings)]
    return Clause(frozenset(w for w in c.words if not any(t in w for t in kept)), frozenset(kept))


def _rank(c: Clause) -> tuple[float, list[str], list[str]]:
    """Most selective first (by `_cost`); then by content, so a gate is the same in every run."""
    return c.cost(), sorted(c.words), sorted(c.substrings)


def _prune(clauses: list[Clause]) -> list[Clause]:
    """The most selective clauses, none implied by another."""
    kept: list[Clause] = []
    for c in sorted({_simplified(c) for c in clauses}, key=_rank):
        if not any(k.implies(c) for k in kept):
            kept.append(c)
    # Checked in this order, and most texts fail the first: a selective clause of few substrings first.
    return sorted(kept[:MAX_CLAUSES], key=lambda c: (len(c.substrings) > 4, _rank(c)))
