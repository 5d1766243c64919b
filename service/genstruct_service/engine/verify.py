"""Verification of a draft: which of its tokens a sequence's own sampler keeps.

The rows of a verified draft are the sequence's fed token and then each drafted token, with
logits at every row. Row i's logits follow the fed token and the first i drafted ones, so
while the sampler picks the drafted token itself, the next row's logits are what decoding
one token per step would have given: the text is the same as without the draft.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def verify(
    draft: Sequence[int], sample: Callable[[int], int], keep: Callable[[int], bool]
) -> list[int]:
    """The tokens a sequence takes from one verified draft, in order.

    `sample(i)` samples at the draft's row i: row 0 is the fed token's, row i > 0 the
    (i-1)-th drafted token's. `keep(token)` is given every sampled token, in order, and says
    whether the sequence goes on as the draft assumes: it has not finished, and nothing was
    forced in behind the token.

    Contract: returns at least one token and at most `len(draft) + 1`. Every token but the
    last equals the drafted token at its index (the sampler picked it itself, and `keep`
    said go on). The last is the first that differs from the draft, or the one after the
    whole draft, or the one where `keep` said stop (which may equal the draft's). So the
    KV cells of the fed token and of `drafted_hits(...)` drafted tokens stay valid.
    """
    k = len(draft)
    tokens: list[int] = []
    for i in range(k + 1):
        token = sample(i)
        tokens.append(token)
        goes_on = keep(token)
        if i == k or token != draft[i] or not goes_on:
            break
    return tokens


def drafted_hits(draft: Sequence[int], tokens: Sequence[int]) -> int:
    """How many of `verify`'s tokens are the draft's own: its accepted drafted tokens."""
    hits = len(tokens) - 1
    if hits < len(draft) and tokens[hits] == draft[hits]:
        hits += 1
    return hits
