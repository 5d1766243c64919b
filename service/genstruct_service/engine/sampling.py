"""One llama.cpp sampler chain per generated sequence (penalties and grammar are stateful)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import llama_cpp as ll

from genstruct_service.engine.types import Sampling

PENALTY_LAST_N = 64


def build_chain(
    vocab: Any,
    n_vocab: int,
    sampling: Sampling,
    seed: int,
    *,
    grammar: str | None,
    banned: Sequence[int],
) -> Any:
    """A sampler chain: [eog ban] [grammar] penalties top_k top_p min_p temp dist (or greedy).

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
    if grammar is not None:
        add(ll.llama_sampler_init_grammar(vocab, grammar.encode(), b"root"), "grammar")
    if (
        sampling.repeat_penalty != 1.0
        or sampling.presence_penalty != 0.0
        or sampling.frequency_penalty != 0.0
    ):
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
    add(ll.llama_sampler_init_dist(seed & 0xFFFFFFFF), "dist")
    return chain
