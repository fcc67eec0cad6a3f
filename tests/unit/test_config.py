"""Configuration: defaults < TOML file < KEFU_* environment < flags, validated."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kefu.config import DEV_SECRET_FILE, Config, build_config, load
from kefu.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kefu.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_in(tmp_path: Path, **kwargs: Any) -> Config:
    """load() with an empty environment and data_dir inside tmp_path unless given."""
    kwargs.setdefault("environ", {})
    flags = dict(kwargs.pop("flags", None) or {})
    flags.setdefault("data_dir", tmp_path / "data")
    return load(flags=flags, **kwargs)


def test_defaults(tmp_path: Path) -> None:
    cfg = load_in(tmp_path, resolve_secret=False)
    assert cfg.port == 8080
    assert cfg.host == "127.0.0.1"
    assert cfg.limits.max_frame_bytes == 64 * 1024
    assert cfg.timeouts.heartbeat_interval == 30.0
    assert cfg.allowed_origins == ()
    assert cfg.jwt_secret == ""
    assert cfg.jwt_secret_source == "unset"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        port = 1001
        node_id = "from-file"
        log_level = "DEBUG"
        [limits]
        rate_burst = 7
        max_page = 17
        [timeouts]
        auth_timeout = 3.5
        heartbeat_misses = 5
        """,
    )
    environ = {"KEFU_PORT": "2002", "KEFU_RATE_BURST": "8", "KEFU_HEARTBEAT_MISSES": "6"}
    cfg = load_in(
        tmp_path,
        config_file=path,
        environ=environ,
        flags={"port": 3003, "heartbeat_misses": None},  # None flags are "not given"
        resolve_secret=False,
    )
    assert cfg.port == 3003  # flag > env > file
    assert cfg.limits.rate_burst == 8  # env > file
    assert cfg.timeouts.heartbeat_misses == 6  # env; the None flag did not override
    assert cfg.node_id == "from-file"
    assert cfg.log_level == "DEBUG"
    assert cfg.limits.max_page == 17
    assert cfg.timeouts.auth_timeout == 3.5
    assert cfg.limits.rate_per_second == 20.0  # default kept
    assert cfg.timeouts.heartbeat_interval == 30.0


def test_config_file_from_kefu_config(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 4321\n")
    cfg = load_in(tmp_path, environ={"KEFU_CONFIG": str(path)}, resolve_secret=False)
    assert cfg.port == 4321


def test_env_types_are_coerced(tmp_path: Path) -> None:
    environ = {
        "KEFU_COMPRESSION": "off",
        "KEFU_USE_UVLOOP": "yes",
        "KEFU_RATE_PER_SECOND": "2.5",
        "KEFU_ALLOWED_ORIGINS": "https://a.example, https://b.example,",
        "KEFU_DATA_DIR": str(tmp_path / "envdata"),
    }
    cfg = load(environ=environ, resolve_secret=False)
    assert cfg.compression is False
    assert cfg.use_uvloop is True
    assert cfg.limits.rate_per_second == 2.5
    assert cfg.allowed_origins == ("https://a.example", "https://b.example")
    assert cfg.data_dir == tmp_path / "envdata"


def test_file_list_of_origins(tmp_path: Path) -> None:
    path = write(tmp_path, 'allowed_origins = ["https://a.example", "https://b.example"]\n')
    cfg = load_in(tmp_path, config_file=path, resolve_secret=False)
    assert cfg.allowed_origins == ("https://a.example", "https://b.example")


def test_unrelated_environment_is_ignored(tmp_path: Path) -> None:
    cfg = load_in(
        tmp_path,
        environ={"KEFU_NOT_A_SETTING": "1", "PORT": "1", "HOME": "/"},
        resolve_secret=False,
    )
    assert cfg.port == 8080


@pytest.mark.parametrize(
    "text",
    [
        "bogus = 1\n",
        "[limits]\nbogus = 1\n",
        "[timeouts]\nmax_frame_bytes = 2048\n",  # real setting, wrong section
        "max_frame_bytes = 2048\n",  # section setting at top level
        "[limits.nested]\nx = 1\n",
        "[nosuchsection]\nport = 1\n",
        "limits = 5\n",
        "jwt_secret_source = 'flag'\n",
    ],
)
def test_unknown_keys_in_file_rejected(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_in(tmp_path, config_file=write(tmp_path, text), resolve_secret=False)


@pytest.mark.parametrize("name", ["bogus", "limits", "jwt_secret_source"])
def test_unknown_flags_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        load_in(tmp_path, flags={name: "1"}, resolve_secret=False)


def test_unknown_override_rejected_by_replace() -> None:
    with pytest.raises(ConfigError):
        Config().replace(nonsense=1)


@pytest.mark.parametrize(
    "environ",
    [
        {"KEFU_PORT": "eighty"},
        {"KEFU_PORT": "70000"},
        {"KEFU_PORT": "-1"},
        {"KEFU_COMPRESSION": "maybe"},
        {"KEFU_RATE_PER_SECOND": "0"},
        {"KEFU_RATE_PER_SECOND": "nan"},
        {"KEFU_RATE_BURST": "0"},
        {"KEFU_RATE_FLOOD_FACTOR": "0.5"},
        {"KEFU_MAX_FRAME_BYTES": "100"},
        {"KEFU_SEND_QUEUE_SOFT_FRAMES": "2000"},  # above send_queue_frames (1024)
        {"KEFU_SEND_QUEUE_SOFT_FRAMES": "0"},
        {"KEFU_MAX_CONNECTIONS_PER_USER": "0"},
        {"KEFU_AUTH_TIMEOUT": "0"},
        {"KEFU_HEARTBEAT_INTERVAL": "-1"},
        {"KEFU_HEARTBEAT_MISSES": "0"},
        {"KEFU_COMPRESSION_WINDOW_BITS": "8"},
        {"KEFU_SQLITE_SYNCHRONOUS": "OFF"},
        {"KEFU_COMMIT_MAX_BATCH": "0"},
        {"KEFU_READ_THREADS": "1.5"},
    ],
)
def test_bad_env_values(tmp_path: Path, environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_in(tmp_path, environ=environ, resolve_secret=False)


@pytest.mark.parametrize(
    "text",
    [
        'port = "eighty"\n',
        "port = true\n",
        "node_id = 5\n",
        "compression = 'sometimes'\n",
        "allowed_origins = 5\n",
        "port = [80]\n",
        "[limits]\nrate_burst = 'many'\n",
        "[timeouts]\nauth_timeout = [1]\n",
    ],
)
def test_bad_file_values(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_in(tmp_path, config_file=write(tmp_path, text), resolve_secret=False)


def test_bad_data_dir_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(config_file=write(tmp_path, "data_dir = 5\n"), environ={}, resolve_secret=False)


@pytest.mark.parametrize(
    "text",
    [
        "[limits]\nrate_burst = 2.5\n",  # KEFU_RATE_BURST=2.5 is refused; so must this be
        "port = 8080.9\n",
        "[limits]\nrate_per_second = true\n",  # a float setting given a boolean
    ],
)
def test_file_values_are_not_silently_coerced(tmp_path: Path, text: str) -> None:
    """A fraction for an integer setting (or a boolean for a number) is a bad value."""
    with pytest.raises(ConfigError):
        load_in(tmp_path, config_file=write(tmp_path, text), resolve_secret=False)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_in(tmp_path, config_file=write(tmp_path, "port = = 1\n"), resolve_secret=False)
    with pytest.raises(ConfigError):
        load_in(tmp_path, config_file=tmp_path / "absent.toml", resolve_secret=False)


def test_bad_flag_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_in(tmp_path, flags={"port": "x"}, resolve_secret=False)


def test_replace_validates_and_keeps_other_settings() -> None:
    cfg = build_config(overrides={"port": 0, "rate_burst": 3})
    changed = cfg.replace(max_frame_bytes=2048)
    assert changed.limits.max_frame_bytes == 2048
    assert changed.limits.rate_burst == 3
    with pytest.raises(ConfigError):
        cfg.replace(max_frame_bytes=10)


# -- the JWT secret ------------------------------------------------------------------------


def test_dev_secret_generated_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "data"  # does not exist yet
    first = load(flags={"data_dir": data}, environ={})
    assert first.jwt_secret_source == "dev"
    assert len(first.jwt_secret) >= 32
    path = data / DEV_SECRET_FILE
    assert path.read_text(encoding="ascii").strip() == first.jwt_secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = load(flags={"data_dir": data}, environ={})
    assert second.jwt_secret == first.jwt_secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_dev_secret_differs_per_data_dir(tmp_path: Path) -> None:
    a = load(flags={"data_dir": tmp_path / "a"}, environ={})
    b = load(flags={"data_dir": tmp_path / "b"}, environ={})
    assert a.jwt_secret != b.jwt_secret


def test_env_secret_used_and_no_file_written(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = load(flags={"data_dir": data}, environ={"KEFU_JWT_SECRET": "from-the-env-secret"})
    assert cfg.jwt_secret == "from-the-env-secret"
    assert cfg.jwt_secret_source == "configured"
    assert not (data / DEV_SECRET_FILE).exists()


def test_flag_secret_beats_env(tmp_path: Path) -> None:
    cfg = load(
        flags={"data_dir": tmp_path, "jwt_secret": "flag-secret"},
        environ={"KEFU_JWT_SECRET": "env-secret"},
    )
    assert cfg.jwt_secret == "flag-secret"
    assert cfg.jwt_secret_source == "flag"


def test_file_secret(tmp_path: Path) -> None:
    path = write(tmp_path, 'jwt_secret = "file-secret"\n')
    cfg = load(config_file=path, flags={"data_dir": tmp_path / "d"}, environ={})
    assert cfg.jwt_secret == "file-secret"
    assert cfg.jwt_secret_source == "configured"
    assert not (tmp_path / "d" / DEV_SECRET_FILE).exists()


def test_empty_env_secret_falls_back_to_dev_secret(tmp_path: Path) -> None:
    cfg = load(flags={"data_dir": tmp_path}, environ={"KEFU_JWT_SECRET": ""})
    assert cfg.jwt_secret_source == "dev"
    assert cfg.jwt_secret


def test_existing_dev_secret_file_is_used(tmp_path: Path) -> None:
    (tmp_path / DEV_SECRET_FILE).write_text("kept-secret\n", encoding="ascii")
    cfg = load(flags={"data_dir": tmp_path}, environ={})
    assert cfg.jwt_secret == "kept-secret"
