"""The greedy fast path: the first largest logit, as llama.cpp's greedy sampler picks it."""

from __future__ import annotations

import llama_cpp as ll
import pytest
from genstruct_service.engine.backend.sampling import build_chain, greedy_token, is_plain_greedy
from genstruct_service.engine.types import Sampling

pytestmark = pytest.mark.model


def test_plain_greedy_only_when_the_chain_is_greedy_alone() -> None:
    assert is_plain_greedy(Sampling(temperature=0.0), banned=())
    assert not is_plain_greedy(Sampling(temperature=0.0), banned=(2,))  # ignore_eos bans
    assert not is_plain_greedy(Sampling(temperature=0.0, repeat_penalty=1.1), banned=())
    assert not is_plain_greedy(Sampling(temperature=0.7), banned=())


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
        chain = build_chain(vocab, n_vocab, Sampling(temperature=0.0), 1, banned=())
        try:
            picked = [greedy_token(ctx, row, n_vocab) for row in range(len(tokens))]
            expected = [int(ll.llama_sampler_sample(chain, ctx, row)) for row in range(len(tokens))]
        finally:
            ll.llama_sampler_free(chain)
        assert picked == expected
        assert len(set(picked)) > 1  # the rows differ: the comparison means something
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)
