"""Drafts from text: where the n-grams of a prompt occur, and one sequence's tokens with the
drafts its longest recent suffix match proposes (from its prompt, its own output, and what
the other generations of its request wrote; failing those, from what other requests wrote,
`RecentTexts`).

Pure Python over token ids, tested without a model (tests/unit/test_speculation_plan.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The most recent occurrences of an n-gram looked at when measuring a match: frequent
# n-grams ("of the") have many, and the most recent ones are the likeliest continuation.
_CANDIDATES = 8


class PromptNgrams:
    """Where each `n`-gram of a prompt occurs: n-gram -> the positions just after it.

    Built once per request, before it reaches the engine thread, and shared read-only by
    the request's generations.
    """

    __slots__ = ("n", "positions", "tokens")

    def __init__(self, tokens: Sequence[int], n: int) -> None:
        self.tokens = list(tokens)
        self.n = n
        positions: dict[tuple[int, ...], list[int]] = {}
        toks = self.tokens
        for end in range(n, len(toks) + 1):
            key = tuple(toks[end - n : end])
            found = positions.get(key)
            if found is None:
                positions[key] = [end]
            else:
                found.append(end)
        self.positions = positions


@dataclass(frozen=True, slots=True)
class Draft:
    tokens: list[int]
    match: int  # length of the suffix match it came from, capped at ngram_max
    # Where the suffix occurs more than once, what the other occurrences go on with:
    # `agreed` leading tokens that another occurrence continues alike and none otherwise,
    # and `contested` when one continues otherwise at the token after them.
    agreed: int = 0
    contested: bool = False
    borrowed: bool = False  # from another request's text (`RecentTexts`)

    def cut(self, length: int) -> Draft:
        """Its first `length` tokens."""
        return Draft(
            self.tokens[:length], self.match, min(self.agreed, length),
            self.contested and self.agreed < length, self.borrowed,
        )


# The tokens `RecentTexts` keeps: about 250 answers of 128 tokens, an index of a few MB.
RECENT_TOKENS = 1 << 15


class RecentTexts:
    """What the engine's recent generations wrote, indexed by n-gram: drafts for a request
    from the text of others (answers from one model restate its phrasing, its list
    numbering and its format from one document to the next).

    Only for a request whose text need not repeat (engine/drafts.py): such a draft depends
    on what ran before. Holds at most `capacity` tokens; past that, the oldest texts go
    until half is left (the newest always stays), and the index is built again.
    """

    __slots__ = ("_positions", "_texts", "_tokens", "capacity", "n")

    def __init__(self, n: int, capacity: int = RECENT_TOKENS) -> None:
        self.n = n
        self.capacity = capacity
        self._texts: list[list[int]] = []  # oldest first
        self._tokens = 0
        # n-gram -> (text, the position just after it) of its occurrences, oldest first
        self._positions: dict[tuple[int, ...], list[tuple[list[int], int]]] = {}

    def __len__(self) -> int:
        return self._tokens

    def add(self, tokens: Sequence[int]) -> None:
        """A generation's text, once it has ended."""
        if len(tokens) <= self.n:
            return
        text = list(tokens[-self.capacity :])
        self._texts.append(text)
        self._tokens += len(text)
        if self._tokens > self.capacity:
            while self._tokens > self.capacity // 2 and len(self._texts) > 1:
                self._tokens -= len(self._texts.pop(0))
            self._positions = {}
            for kept in self._texts:
                self._index(kept)
        else:
            self._index(text)

    def _index(self, text: list[int]) -> None:
        n, positions = self.n, self._positions
        for end in range(n, len(text)):  # an n-gram at the very end has nothing after it
            key = tuple(text[end - n : end])
            found = positions.get(key)
            if found is None:
                positions[key] = [(text, end)]
            else:
                found.append((text, end))

    def occurrences(self, key: tuple[int, ...]) -> list[tuple[list[int], int]]:
        """The most recent occurrences of an n-gram, the latest last."""
        return self._positions.get(key, [])[-_CANDIDATES:]


class History:
    """One sequence's tokens (its prompt, then what it generated) and drafts from them, and
    from what the other generations of its request wrote (`share`): generations of one
    document often restate the same spans."""

    __slots__ = ("_generated", "_max", "_n", "_own", "_peers", "_prompt", "_prompt_len")

    def __init__(self, prompt: PromptNgrams, ngram_max: int) -> None:
        self._prompt = prompt
        self._prompt_len = len(prompt.tokens)
        self._n = prompt.n
        self._max = ngram_max
        self._generated: list[int] = []
        # n-grams that end in the generated part (positions in prompt + generated)
        self._own: dict[tuple[int, ...], list[int]] = {}
        self._peers: tuple[History, ...] = ()

    @staticmethod
    def share(histories: Sequence[History]) -> None:
        """Let each of one request's generations draft from the others' text too."""
        for h in histories:
            h._peers = tuple(p for p in histories if p is not h)

    def __len__(self) -> int:
        return self._prompt_len + len(self._generated)

    def _at(self, i: int) -> int:
        p = self._prompt_len
        return self._prompt.tokens[i] if i < p else self._generated[i - p]

    def _slice(self, start: int, stop: int) -> list[int]:
        p = self._prompt_len
        if stop <= p:
            return self._prompt.tokens[start:stop]
        head = self._prompt.tokens[start:p] if start < p else []
        return head + self._generated[max(start - p, 0) : stop - p]

    def append(self, token: int) -> None:
        self._generated.append(token)
        end = len(self)
        n = self._n
        if end < n:
            return
        key = tuple(self._slice(end - n, end))
        found = self._own.get(key)
        if found is None:
            self._own[key] = [end]
        else:
            found.append(end)

    @property
    def generated(self) -> list[int]:
        """The tokens this sequence generated (not a copy: read, never change)."""
        return self._generated

    def draft(self, limit: int, recent: RecentTexts | None = None) -> Draft | None:
        """The tokens that followed the longest recent match of this sequence's suffix: in
        its own text, its prompt, then its peers' text (the first found wins a tie), and
        how far the suffix n-gram's other occurrences agree with them (`_agreement`).
        Where none of those has the suffix, the longest match in `recent`, other requests'
        texts (`borrowed`; their agreement is not weighed: where texts of other documents
        agree, this one often goes on otherwise)."""
        n = self._n
        end = len(self)
        if limit < 1 or end <= n:
            return None
        key = tuple(self._slice(end - n, end))
        sources = [(self, self._own.get(key)), (self, self._prompt.positions.get(key))]
        sources += [(peer, peer._own.get(key)) for peer in self._peers]
        best: tuple[History, int] | None = None
        best_len = 0
        seen: list[tuple[History, int]] = []  # every occurrence looked at
        for where, found in sources:
            if not found:
                continue
            for at in reversed(found[-_CANDIDATES:]):  # the most recent first
                if where is self and at >= end:  # the suffix itself
                    continue
                seen.append((where, at))
                length, room = n, min(at, end)  # a peer's match may lie past our end
                while (
                    length < self._max
                    and room - length > 0
                    and where._at(at - length - 1) == self._at(end - length - 1)
                ):
                    length += 1
                if length > best_len:
                    best, best_len = (where, at), length
        if best is None:
            return None if recent is None else self._borrow(key, limit, recent)
        where, at = best
        if where is not self:
            tokens = where._slice(at, min(at + limit, len(where)))
        else:
            # In its own text, what followed the match runs up to now, and the text then goes
            # on as it did from there: the same span again. So a loop (a list, a repeated
            # line) is drafted up to `limit`, as drafting token by token from the last n-gram
            # would.
            span = self._slice(at, min(at + limit, end))
            tokens = (span * -(-limit // len(span)))[:limit]
        if not tokens:
            return None
        agreed, contested = self._agreement(tokens, seen, end)
        return Draft(tokens, best_len, agreed, contested)

    def _borrow(self, key: tuple[int, ...], limit: int, recent: RecentTexts) -> Draft | None:
        """What followed the longest match of the suffix in other requests' texts."""
        end = len(self)
        best: tuple[list[int], int] | None = None
        best_len = 0
        for text, at in reversed(recent.occurrences(key)):  # the most recent first
            length = self._n
            while (
                length < self._max
                and at - length > 0
                and end - length > 0
                and text[at - length - 1] == self._at(end - length - 1)
            ):
                length += 1
            if length > best_len:
                best, best_len = (text, at), length
        if best is None:
            return None
        text, at = best
        return Draft(text[at : at + limit], best_len, borrowed=True)

    def _agreement(
        self, tokens: list[int], seen: list[tuple[History, int]], end: int
    ) -> tuple[int, bool]:
        """How far the other occurrences of the suffix's n-gram go on as `tokens` do: the
        leading tokens none continues otherwise, and whether one then does (0 and False
        where the n-gram occurs once). Where a list or a loop repeats a line, a counter in
        it is the first token its occurrences disagree on."""
        if len(seen) < 2:
            return 0, False
        spans = [
            where._slice(at, min(at + len(tokens), end if where is self else len(where)))
            for where, at in seen
        ]
        for j, token in enumerate(tokens):
            here = [span[j] for span in spans if len(span) > j]
            if len(here) > 1 and any(t != token for t in here):
                return j, True
        return len(tokens), False
