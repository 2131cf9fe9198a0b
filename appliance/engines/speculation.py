"""Draftless speculative decoding: drafts come from the sequence itself (prompt lookup).

A grounded answer copies phrases from its sources; code edits copy the code they were shown. When the
last `n` tokens of a sequence occurred before in its prompt or output, the tokens that followed them then
are a good guess for what follows now. The scheduler decodes the guess with the pending token in one
step and keeps the longest run the model agrees with (engines/scheduler.py), so no draft model is needed
and the output is exactly what one-token-at-a-time decoding would give.
"""

from __future__ import annotations


class NgramDrafter:
    """Where each n-gram of a token history last occurred, kept up to date as tokens are appended.

    `_next[gram]` is the index of the token that followed the gram's latest occurrence, so the
    occurrence at the very end of the history (whose next token is unknown) is never its own match.
    """

    def __init__(self, tokens: list[int], n: int) -> None:
        self.n = n
        self.history: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        h, n = self.history, self.n
        for token in tokens:
            if len(h) >= n:
                self._next[tuple(h[-n:])] = len(h)
            h.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the history's last n tokens."""
        h, n = self.history, self.n
        if limit <= 0 or len(h) < n:
            return []
        start = self._next.get(tuple(h[-n:]))
        return [] if start is None else h[start : start + limit]
