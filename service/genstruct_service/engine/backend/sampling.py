"""One sampler per generated sequence (penalties and grammar are stateful), over llama.cpp's
sampler chains; each offers `sample(row)`, `accept(token)` and `close()` (engine/sequence.py's
TokenSampler)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp as ll
import numpy as np

from genstruct_service.engine.types import Sampling

PENALTY_LAST_N = 64
# llama.cpp's dist sampler takes this seed to mean "a random one" (LLAMA_DEFAULT_SEED).
RANDOM_SEED = 0xFFFFFFFF


def dist_seed(seed: int) -> int:
    """A caller's seed (plus a generation index) as llama.cpp's 32-bit seed, never the value
    that means random: the same seed must give the same text."""
    return seed % RANDOM_SEED


def _penalized(sampling: Sampling) -> bool:
    return (
        sampling.repeat_penalty != 1.0
        or sampling.presence_penalty != 0.0
        or sampling.frequency_penalty != 0.0
    )


def is_plain_greedy(sampling: Sampling) -> bool:
    """True when `build_chain` makes a greedy sampler, behind at most a ban of some tokens,
    so the token is the first largest logit of the tokens not banned (`greedy_token`):
    nothing to copy into a candidate list first."""
    return sampling.temperature <= 0.0 and not _penalized(sampling)


def greedy_token(ctx: Any, row: int, n_vocab: int, banned: Sequence[int] = ()) -> int:
    """The first largest logit of a batch row among the tokens not `banned`, as llama.cpp's
    greedy sampler picks it behind a -inf logit bias on them.

    Filling llama.cpp's candidate list costs a copy of the whole vocabulary per row (0.27 ms
    against 0.02 for the argmax, 262k tokens, AMD EPYC), and every verified draft row pays
    it. A banned token is rarely the largest, so the row is copied only when it is.
    """
    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
    token = int(np.argmax(logits))
    if banned and token in banned:
        logits = logits.copy()
        logits[list(banned)] = -np.inf
        token = int(np.argmax(logits))
    return token


def build_chain(
    vocab: Any,
    n_vocab: int,
    sampling: Sampling,
    seed: int,
    *,
    banned: Sequence[int],
) -> Any:
    """A sampler chain: [eog ban] penalties top_k top_p min_p temp dist (or greedy).

    `banned` tokens get a -inf logit bias (the end-of-generation tokens when ignore_eos).
    Samplers that would do nothing are left out, to keep sampling over a large vocabulary
    cheap. The caller frees the chain with `ll.llama_sampler_free`.
    """
    params = ll.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = ll.llama_sampler_chain_init(params)
    if not chain:
        raise RuntimeError("llama_sampler_chain_init failed")

    def add(sampler: Any, what: str) -> None:
        if not sampler:
            ll.llama_sampler_free(chain)
            raise RuntimeError(f"could not create the {what} sampler")
        ll.llama_sampler_chain_add(chain, sampler)

    if banned:
        biases = (ll.llama_logit_bias * len(banned))()
        for i, token in enumerate(banned):
            biases[i] = ll.llama_logit_bias(token, float("-inf"))
        add(ll.llama_sampler_init_logit_bias(n_vocab, len(banned), biases), "logit bias")
    if _penalized(sampling):
        add(
            ll.llama_sampler_init_penalties(
                n_vocab,
                PENALTY_LAST_N,
                sampling.repeat_penalty,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            ),
            "penalties",
        )
    if sampling.temperature <= 0.0:
        add(ll.llama_sampler_init_greedy(), "greedy")
        return chain
    if sampling.top_k > 0:
        add(ll.llama_sampler_init_top_k(sampling.top_k), "top-k")
    if sampling.top_p < 1.0:
        add(ll.llama_sampler_init_top_p(sampling.top_p, 1), "top-p")
    if sampling.min_p > 0.0:
        add(ll.llama_sampler_init_min_p(sampling.min_p, 1), "min-p")
    add(ll.llama_sampler_init_temp(sampling.temperature), "temperature")
    add(ll.llama_sampler_init_dist(dist_seed(seed)), "dist")
    return chain


def build_grammar(vocab: Any, grammar: str) -> Any:
    """A grammar sampler kept apart from the chain: see `ConstrainedSampler`."""
    sampler = ll.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise RuntimeError("the grammar could not be parsed")
    return sampler


class ConstrainedSampler:
    """Grammar-constrained sampling that applies the grammar to the whole vocabulary rarely.

    Checking every one of a large vocabulary's tokens against a grammar costs far more than
    a decode step, so, as llama.cpp's server does, the chain samples freely first and the
    grammar only checks that one token; only when it is rejected is the grammar applied to
    every candidate and the chain run again. One instance (its candidate buffer) serves
    every sequence on the engine thread.
    """

    def __init__(self, ctx: Any, n_vocab: int) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._cand = np.zeros(
            n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        )
        self._cand["id"] = np.arange(n_vocab, dtype=np.int32)
        self._ids = self._cand["id"].copy()
        data = ctypes.cast(self._cand.ctypes.data, ctypes.POINTER(ll.llama_token_data))
        self._array = ll.llama_token_data_array(data, n_vocab, -1, False)
        self._array_p = ctypes.pointer(self._array)
        self._one = (ll.llama_token_data * 1)()
        self._one_array = ll.llama_token_data_array(self._one, 1, -1, False)
        self._one_p = ctypes.pointer(self._one_array)

    def _fill(self, row: int) -> None:
        logits = ll.llama_get_logits_ith(self._ctx, row)
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        cand["p"] = 0.0
        self._array.size = self._n_vocab
        self._array.selected = -1
        self._array.sorted = False

    def _selected(self) -> int:
        return int(self._cand["id"][self._array.selected])

    def allows(self, grammar: Any, token: int) -> bool:
        self._one[0] = ll.llama_token_data(token, 0.0, 0.0)
        self._one_array.size = 1
        self._one_array.selected = -1
        ll.llama_sampler_apply(grammar, self._one_p)
        return bool(np.isfinite(self._one[0].logit))

    def sample(self, chain: Any, grammar: Any, row: int) -> int:
        self._fill(row)
        ll.llama_sampler_apply(chain, self._array_p)
        token = self._selected()
        if not self.allows(grammar, token):
            self._fill(row)
            ll.llama_sampler_apply(grammar, self._array_p)
            ll.llama_sampler_apply(chain, self._array_p)
            token = self._selected()
        ll.llama_sampler_accept(chain, token)
        ll.llama_sampler_accept(grammar, token)
        return token


@dataclass(frozen=True, slots=True)
class GreedySampler:
    """A greedy sampler: the first largest logit of the tokens not banned, with no candidate
    list to fill."""

    ctx: Any
    n_vocab: int
    banned: tuple[int, ...] = ()

    def sample(self, row: int) -> int:
        return greedy_token(self.ctx, row, self.n_vocab, self.banned)

    def take_forced(self, token: int) -> None:
        """Greedy holds no state: nothing to take."""

    def close(self) -> None:
        """Nothing to free."""


class ChainSampler:
    """A llama.cpp sampler chain (`build_chain`), which it frees."""

    __slots__ = ("_chain", "_ctx")

    def __init__(self, ctx: Any, chain: Any) -> None:
        self._ctx = ctx
        self._chain = chain

    def sample(self, row: int) -> int:
        return int(ll.llama_sampler_sample(self._chain, self._ctx, row))

    def take_forced(self, token: int) -> None:
        ll.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain:
            ll.llama_sampler_free(self._chain)
            self._chain = None


class GrammarSampler:
    """A chain and a grammar kept apart from it, sampled through a `ConstrainedSampler`."""

    __slots__ = ("_chain", "_constrained", "_grammar")

    def __init__(self, constrained: ConstrainedSampler, chain: Any, grammar: Any) -> None:
        self._constrained = constrained
        self._chain = chain
        self._grammar = grammar

    def sample(self, row: int) -> int:
        return self._constrained.sample(self._chain, self._grammar, row)

    def take_forced(self, token: int) -> None:
        ll.llama_sampler_accept(self._chain, token)
        ll.llama_sampler_accept(self._grammar, token)

    def close(self) -> None:
        for sampler in (self._chain, self._grammar):
            if sampler:
                ll.llama_sampler_free(sampler)
        self._chain = self._grammar = None


def make_sampler(
    ctx: Any, vocab: Any, n_vocab: int, constrained: ConstrainedSampler, sampling: Sampling,
    seed: int, *, grammar: str | None, banned: Sequence[int],
) -> GreedySampler | ChainSampler | GrammarSampler:
    """One sequence's sampler for `sampling`: greedy alone where it may be, a grammar apart
    from its chain where there is one."""
    if grammar is None and is_plain_greedy(sampling):
        return GreedySampler(ctx, n_vocab, tuple(banned))
    chain = build_chain(vocab, n_vocab, sampling, seed, banned=banned)
    if grammar is None:
        return ChainSampler(ctx, chain)
    try:
        return GrammarSampler(constrained, chain, build_grammar(vocab, grammar))
    except BaseException:
        ll.llama_sampler_free(chain)
        raise
