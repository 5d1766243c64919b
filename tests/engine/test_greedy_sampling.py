"""The greedy fast path: the first largest logit of the tokens not banned, as llama.cpp's
greedy sampler picks it behind a logit bias."""

from __future__ import annotations

import llama_cpp as ll
import pytest
from genstruct_service.engine.backend.sampling import build_chain, greedy_token, is_plain_greedy
from genstruct_service.engine.types import Sampling

pytestmark = pytest.mark.model


def test_plain_greedy_only_when_the_chain_is_greedy_behind_a_ban() -> None:
    assert is_plain_greedy(Sampling(temperature=0.0))
    assert not is_plain_greedy(Sampling(temperature=0.0, repeat_penalty=1.1))
    assert not is_plain_greedy(Sampling(temperature=0.7))


def test_greedy_token_is_the_greedy_samplers_choice_on_every_row(model_path: str) -> None:
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(model_path.encode(), ll.llama_model_default_params())
    cparams = ll.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_threads = 256, 64, 2
    ctx = ll.llama_init_from_model(model, cparams)
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    batch = ll.llama_batch_init(64, 0, 1)
    try:
        tokens = [(i * 7919 + 13) % n_vocab for i in range(48)]
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, 1
        batch.n_tokens = len(tokens)
        assert ll.llama_decode(ctx, batch) == 0
        rows = range(len(tokens))
        unbanned = [greedy_token(ctx, row, n_vocab) for row in rows]
        assert len(set(unbanned)) > 1  # the rows differ: the comparisons mean something
        # no ban; a ban that misses every row's largest logit; a ban of every row's largest
        # logit, so each row's second largest is the choice
        misses = tuple(t for t in range(8) if t not in unbanned)
        for banned in ((), misses, tuple(sorted(set(unbanned)))):
            chain = build_chain(vocab, n_vocab, Sampling(temperature=0.0), 1, banned=banned)
            try:
                expected = [int(ll.llama_sampler_sample(chain, ctx, row)) for row in rows]
            finally:
                ll.llama_sampler_free(chain)
            picked = [greedy_token(ctx, row, n_vocab, banned) for row in rows]
            assert picked == expected, banned
            assert not set(picked) & set(banned)
        # the fallback copied the row: the logits llama.cpp holds are as they were
        assert [greedy_token(ctx, row, n_vocab) for row in rows] == unbanned
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)
