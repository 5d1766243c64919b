# ruff: noqa: RUF001  (text in other scripts is the point of this file)
"""Text assembly without a model: UTF-8 completed across pieces, stop strings never leaked."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from genstruct_service.engine.text import StopScanner, TextAssembler
from hypothesis import given
from hypothesis import strategies as st

DOCUMENTS = [
    "Photosynthesis turns light into chemical energy.",
    "Die Größe der Bäume überrascht.",
    "Фотосинтез превращает свет в химическую энергию.",
    "光合作用将光能转化为化学能。",
    "光合成は光を化学エネルギーに変える。",
    "التمثيل الضوئي يحول الضوء إلى طاقة كيميائية.",
    "प्रकाश संश्लेषण प्रकाश को रासायनिक ऊर्जा में बदलता है।",
    "Emoji: 🌱☀️➡️🔋 and a family 👨‍👩‍👧‍👦 with flags 🇫🇷🇯🇵.",
]


def byte_pieces(text: str, size: int) -> list[bytes]:
    data = text.encode()
    return [data[i : i + size] for i in range(0, len(data), size)]


def assemble(pieces: Iterable[bytes], stops: Iterable[str]) -> tuple[list[str], bool]:
    """Run pieces through a TextAssembler as the engine does: the released deltas and
    whether a stop was hit."""
    assembler = TextAssembler(stops)
    deltas = [d for d in (assembler.push(p) for p in pieces) if d]
    if not assembler.stopped:
        tail = assembler.finish()
        if tail:
            deltas.append(tail)
    return deltas, assembler.stopped


@pytest.mark.parametrize("text", DOCUMENTS)
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_pieces_splitting_characters_reassemble_without_replacement(text: str, size: int) -> None:
    deltas, stopped = assemble(byte_pieces(text, size), stops=())
    assert not stopped
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_a_partial_character_is_held_until_it_completes() -> None:
    assembler = TextAssembler(stops=())
    smile = "😀".encode()
    assert assembler.push(b"a" + smile[:2]) == "a"
    assert assembler.mid_character
    assert assembler.push(smile[2:]) == "😀"
    assert not assembler.mid_character


def test_truncated_bytes_at_the_end_become_a_replacement_character() -> None:
    deltas, _ = assemble([b"ok", "😀".encode()[:3]], stops=())
    assert "".join(deltas) == "ok\ufffd"


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_stop_string_across_pieces_is_cut_and_never_released(size: int) -> None:
    text = "What is it? [[[Assistant]]] A leaf.\n[[[User]]] And then?"
    deltas, stopped = assemble(byte_pieces(text, size), stops=("[[[User]]]",))
    assert stopped
    assert "".join(deltas) == "What is it? [[[Assistant]]] A leaf.\n"
    assert not any("[[[U" in d for d in deltas)


def test_held_suffix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    scanner = StopScanner(["[[[User]]]"])
    assert scanner.push("Q? [[[") == ("Q? ", False)
    assert scanner.push("Assistant]]] A") == ("[[[Assistant]]] A", False)


def test_held_suffix_is_flushed_at_the_end() -> None:
    deltas, stopped = assemble([b"ends with [[[Us"], stops=("[[[User]]]",))
    assert not stopped
    assert "".join(deltas) == "ends with [[[Us"


def test_earliest_of_several_stops_wins_and_text_after_is_dropped() -> None:
    deltas, stopped = assemble([b"one END two STOP three"], stops=("STOP", "END"))
    assert stopped
    assert deltas == ["one "]
    assembler = TextAssembler(stops=("END",))
    assembler.push(b"xEND")
    assert assembler.push(b"more") == ""
    assert assembler.finish() == ""
    assert assembler.text == "x"


def test_stop_in_non_latin_script_split_inside_a_character() -> None:
    text = "答案是：光合作用。停止这里的内容"
    deltas, stopped = assemble(byte_pieces(text, 2), stops=("停止",))
    assert stopped
    assert "".join(deltas) == "答案是：光合作用。"


def test_overlapping_prefixes_are_held_back_longest_first() -> None:
    scanner = StopScanner(["abcd", "bcx"])
    out, stopped = scanner.push("zabc")
    assert (out, stopped) == ("z", False)
    assert scanner.push("x") == ("a", True)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    """`data` cut at `points` (any byte offsets, so inside characters too)."""
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(
    text=st.text(alphabet=st.sampled_from("ab[]\n é光🌱"), max_size=40),
    stops=st.lists(st.text(alphabet=st.sampled_from("ab[]\n é光🌱"), min_size=1, max_size=4),
                   max_size=3),
    points=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_any_cut_of_any_text_releases_the_text_up_to_a_stop(
    text: str, stops: list[str], points: list[int]
) -> None:
    """Whatever the pieces, the text released is the text up to where a stop string begins
    (all of it when none occurs), and no delta ever holds a stop string. Which stop ends
    it may depend on the cut, when one stop completes inside another: `[` in ` [[`."""
    deltas, stopped = assemble(_cuts(text.encode(), points), stops)
    released = "".join(deltas)
    assert text.startswith(released)
    assert stopped == any(s in text for s in stops)
    if stopped:
        assert any(text.startswith(s, len(released)) for s in stops)
    else:
        assert released == text
    so_far = ""
    for delta in deltas:
        so_far += delta
        assert not any(s in so_far for s in stops)


@given(data=st.binary(max_size=40), points=st.lists(st.integers(0, 60), max_size=12))
def test_any_cut_of_any_bytes_decodes_as_the_whole_would(data: bytes, points: list[int]) -> None:
    """Invalid bytes and characters cut anywhere read as one decode of all the bytes."""
    deltas, _ = assemble(_cuts(data, points), stops=())
    assert "".join(deltas) == data.decode("utf-8", "replace")
