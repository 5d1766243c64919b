"""The GBNF grammar of constrained mode: `question [[[Assistant]]] answer`, both non-empty.

Neither part may contain `[`, so the only `[` the model can write starts the assistant
marker, which the grammar then forces to completion, and a new `[[[User]]]` turn cannot
begin. Each part allows at most one whitespace character before its first visible one, so
after one or two tokens it is non-empty; the grammar accepts the end of sequence anywhere
after the answer's first visible character. The engine forces the rest of the marker when
the token budget runs low (engine/sequence.py's `AnswerMarker`, given these through
`prompt.GENSTRUCT_FORMAT`), so a LENGTH finish still parses.
"""

from __future__ import annotations

ASSISTANT_MARK = "[[[Assistant]]]"

GENSTRUCT_GBNF = r"""
root     ::= question "[[[Assistant]]]" answer
question ::= space? visible [^\[]*
answer   ::= space? visible [^\[]*
space    ::= [ \t\n]
visible  ::= [^\[ \t\n\r]
"""

# Tokens kept in reserve for the answer after a forced marker: a space, and up to four
# byte-fallback tokens of one visible character.
ANSWER_RESERVE = 6
