"""The model's tokenizer, safe to call from any thread (llama.cpp's vocabulary is read-only).

The engine thread uses it for pieces of generated tokens and forced markers; prompts are
tokenized before they reach the engine thread, on a worker thread, so a burst of long
documents does not stall the slots that are generating.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp as ll

from genstruct_service.errors import InvalidRequest


class LlamaTokenizer:
    """Text to token ids and back, with the model's vocabulary."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._pieces: dict[int, bytes] = {}  # token -> bytes; filled as tokens are seen
        self.n_vocab = int(ll.llama_vocab_n_tokens(vocab))
        # the end-of-generation tokens (end of sequence, end of turn, ...)
        self.eog_tokens = [t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(vocab, t)]
        self.eog = frozenset(self.eog_tokens)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Ids of `text`; `add_special` adds the model's BOS. Special-token text stays text."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (ll.llama_token * size)()  # per call: several threads may tokenize at once
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, False)
            if n >= 0:
                return buf[:n]
            if -n <= size:
                raise InvalidRequest("document", "the text could not be tokenized")
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes of one token (possibly part of a UTF-8 character)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of `tokens`; a character cut at the end is dropped."""
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "ignore")
