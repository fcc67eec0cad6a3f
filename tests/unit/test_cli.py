"""The ``kefu`` command: version, token (same secret resolution as serve), config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kefu import __version__
from kefu.auth import verify_token
from kefu.cli import main
from kefu.config import dev_secret
from kefu.model import Role


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"kefu {__version__}"


def test_token_uses_the_configured_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEFU_JWT_SECRET", "from-the-environment-0123456789abcdef")
    assert main(["token", "--user", "u1", "--role", "agent", "--data-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    principal = verify_token("from-the-environment-0123456789abcdef", token)
    assert (principal.user_id, principal.role) == ("u1", Role.AGENT)


def test_token_without_secret_uses_the_dev_secret_loudly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KEFU_JWT_SECRET", raising=False)
    monkeypatch.delenv("KEFU_CONFIG", raising=False)
    assert main(["token", "--user", "u2", "--role", "customer", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "KEFU_JWT_SECRET is not set" in out.err
    verify_token(dev_secret(tmp_path), out.out.strip())  # the secret the node will use


def test_config_file_and_set_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEFU_JWT_SECRET", "x" * 40)
    conf = tmp_path / "kefu.toml"
    conf.write_text("[limits]\nno_such_setting = 1\n")
    assert main(["token", "--user", "u", "--role", "admin", "--config", str(conf)]) == 2
    assert "configuration error" in capsys.readouterr().err
    assert main(["token", "--user", "u", "--role", "admin", "--set", "port=notanumber"]) == 2
