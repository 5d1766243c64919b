"""Every setting has a description, an env var and a flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from genstruct_service.config import Settings, settings_from_args
from pydantic import ValidationError


def test_every_field_is_described() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert missing == []


def test_defaults_bind_loopback_only() -> None:
    settings = settings_from_args([])
    assert settings.host == "127.0.0.1"
    assert settings.model == "genstruct-7b:Q4_K_M"
    assert settings.auth_token is None and not settings.tls_enabled


def test_env_vars_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSTRUCT_N_PARALLEL", "6")
    monkeypatch.setenv("GENSTRUCT_PORT", "6000")
    monkeypatch.setenv("GENSTRUCT_AUTH_TOKEN", "s3cret")
    settings = settings_from_args(["--port", "7000", "--n-ctx", "4096", "--flash-attn", "on"])
    assert settings.n_parallel == 6  # from the environment
    assert settings.port == 7000  # the flag wins over the environment
    assert settings.n_ctx == 4096 and settings.flash_attn == "on"
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "70000"], "port"),
        (["--tls-cert-file", "/x.pem"], "tls_key_file"),
        (["--default-max-tokens", "4096"], "max_tokens_limit"),
        (["--n-parallel", "64", "--n-ctx", "1024"], "per slot"),
        (["--n-parallel", "8", "--n-batch", "4"], "n_batch (4) must be at least n_parallel"),
        (["--n-ubatch", "1024"], "n_ubatch (1024) must be at most n_batch"),
        (["--cache-type-v", "q8_0", "--flash-attn", "off"], "needs flash_attn"),
        (["--flash-attn", "sometimes"], "flash_attn"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(args: list[str], words: str) -> None:
    with pytest.raises((ValidationError, SystemExit)) as info:
        settings_from_args(args)
    assert words in str(info.value)


def test_the_token_can_come_from_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    settings = settings_from_args(["--auth-token-file", str(token)])
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == "s3cret"
    with pytest.raises(ValidationError, match="not both"):
        settings_from_args(["--auth-token-file", str(token), "--auth-token", "x"])
    with pytest.raises(ValidationError, match="cannot be read"):
        settings_from_args(["--auth-token-file", str(tmp_path / "missing")])


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_an_empty_token_is_refused(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    monkeypatch.setenv("GENSTRUCT_AUTH_TOKEN", blank)
    with pytest.raises(ValidationError, match="auth_token is empty or blank"):
        settings_from_args([])


@pytest.mark.parametrize(
    "args, bound",
    [
        ([], "127.0.0.1"),
        (["--host", "0.0.0.0"], "127.0.0.1"),  # issue 34: the metrics went with the service
        (["--host", "::"], "::1"),
        (["--host", "10.1.2.3"], "10.1.2.3"),
        (["--host", "0.0.0.0", "--metrics-host", "0.0.0.0"], "0.0.0.0"),
    ],
)
def test_metrics_bind_loopback_unless_told_otherwise(args: list[str], bound: str) -> None:
    assert settings_from_args(args).metrics_bind_host == bound


def test_help_lists_every_flag() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from genstruct_service.config import settings_from_args as s; s(['--help'])",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in result.stdout, name
