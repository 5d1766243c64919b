"""Reading what llama.cpp resolved from the lines it logs."""

from __future__ import annotations

from genstruct_service.engine.backend.llama_log import flash_attn_in_force

ENABLED = "resolve_fused_ops: Flash Attention enabled\n"
UNSUPPORTED = "resolve_fused_ops: Flash Attention not supported, set to disabled\n"


def test_auto_reads_what_llama_cpp_decided() -> None:
    assert flash_attn_in_force("auto", ["llama_context: n_ctx = 512\n", ENABLED]) == "on"
    assert flash_attn_in_force("auto", [UNSUPPORTED]) == "off"


def test_an_explicit_setting_is_what_is_in_force() -> None:
    assert flash_attn_in_force("off", [ENABLED]) == "off"
    assert flash_attn_in_force("on", []) == "on"


def test_auto_stays_auto_when_the_log_does_not_say() -> None:
    assert flash_attn_in_force("auto", ["llama_context: n_ctx = 512\n"]) == "auto"
