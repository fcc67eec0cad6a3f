"""The ``kefu`` command: version, token (same secret resolution as serve), config errors;
the cluster flags of serve, migrate and route, and the arguments of cluster up/down."""

from __future__ import annotations

from pathlib import Path

import pytest

from kefu import __version__, cli
from kefu.auth import verify_token
from kefu.cli import main
from kefu.cluster import local
from kefu.config import Config, dev_secret, redact_url
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


# -- cluster settings on the command line ----------------------------------------------------------

REDIS = "redis://127.0.0.1:6390/0"
DATABASE = "postgresql://kefu:s3cret@127.0.0.1:5499/kefu"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("KEFU_CONFIG", "KEFU_REDIS_URL", "KEFU_DATABASE_URL", "KEFU_RING_VNODES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEFU_JWT_SECRET", "x" * 40)
    return monkeypatch


def test_serve_flags_set_the_cluster_urls(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Config] = []
    clean_env.setattr(cli, "run", lambda cfg, reload=None: seen.append(cfg))
    argv = ["serve", "--data-dir", str(tmp_path), "--redis-url", REDIS, "--database-url", DATABASE]
    assert main(argv) == 0
    assert (seen[0].cluster.redis_url, seen[0].cluster.database_url) == (REDIS, DATABASE)
    # The flags beat --set, the environment and the file (like every other flag).
    conf = tmp_path / "kefu.toml"
    conf.write_text('[cluster]\nredis_url = "redis://127.0.0.1:1/0"\n')
    clean_env.setenv("KEFU_DATABASE_URL", "postgresql://env@127.0.0.1:2/kefu")
    argv = ["serve", "--config", str(conf), "--set", "redis_url=redis://127.0.0.1:3/0"]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 0
    assert seen[1].cluster.redis_url == "redis://127.0.0.1:3/0"
    assert seen[1].cluster.database_url == "postgresql://env@127.0.0.1:2/kefu"
    assert main([*argv, "--data-dir", str(tmp_path), "--redis-url", REDIS]) == 0
    assert seen[2].cluster.redis_url == REDIS


def test_serve_rejects_a_url_of_the_wrong_kind(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setattr(cli, "run", lambda cfg: pytest.fail("must not run"))
    assert main(["serve", "--redis-url", "http://127.0.0.1:6379"]) == 2
    assert "redis_url must be a redis:// URL" in capsys.readouterr().err
    assert main(["serve", "--database-url", "mysql://127.0.0.1/kefu"]) == 2
    assert "database_url must be a postgresql:// URL" in capsys.readouterr().err


def test_migrate_resolves_the_database_like_serve(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    calls: list[tuple[str, float]] = []

    async def fake(url: str, *, timeout: float = 5.0) -> tuple[list[int], int]:
        calls.append((url, timeout))
        return ([1] if len(calls) == 1 else []), 1

    clean_env.setattr(cli, "migrate_database", fake)
    conf = tmp_path / "kefu.toml"
    conf.write_text(f'[cluster]\ndatabase_url = "{DATABASE}"\npg_command_timeout = 2.5\n')
    assert main(["migrate", "--config", str(conf)]) == 0
    assert calls[-1] == (DATABASE, 2.5)
    assert capsys.readouterr().out.splitlines() == [
        "applied migration 0001_initial",
        "schema is current (version 1)",
    ]
    clean_env.setenv("KEFU_DATABASE_URL", "postgresql://env@127.0.0.1:2/kefu")
    assert main(["migrate", "--config", str(conf)]) == 0
    assert calls[-1][0] == "postgresql://env@127.0.0.1:2/kefu"
    assert capsys.readouterr().out.splitlines() == ["schema is current (version 1)"]
    assert main(["migrate", "--config", str(conf), "--database-url", "postgres://f@h/d"]) == 0
    assert calls[-1][0] == "postgres://f@h/d"
    assert not list(tmp_path.glob("**/dev-jwt-secret"))  # migrate signs nothing


def test_migrate_and_route_need_a_url(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "no database configured" in err and "--database-url" in err
    assert main(["route", "cust-1"]) == 2
    err = capsys.readouterr().err
    assert "no Redis configured" in err and "--redis-url" in err
    assert main(["migrate", "--database-url", "redis://127.0.0.1/0"]) == 2
    assert "configuration error" in capsys.readouterr().err


def test_route_resolves_redis_and_vnodes_like_serve(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, str, int]] = []

    async def fake(url: str, user_id: str, vnodes: int) -> list[tuple[str, str]] | str:
        calls.append((url, user_id, vnodes))
        return [("user", user_id), ("node", "n1")] if user_id != "nobody" else "no live node"

    clean_env.setattr(cli, "_home", fake)
    clean_env.setenv("KEFU_REDIS_URL", REDIS)
    clean_env.setenv("KEFU_RING_VNODES", "40")
    assert main(["route", "cust-1"]) == 0
    assert calls[-1] == (REDIS, "cust-1", 40)
    assert capsys.readouterr().out.splitlines() == ["user: cust-1", "node: n1"]
    assert (
        main(["route", "--redis-url", "redis://127.0.0.1:7000/1", "--set", "ring_vnodes=7", "u"])
        == 0
    )
    assert calls[-1] == ("redis://127.0.0.1:7000/1", "u", 7)
    capsys.readouterr()
    assert main(["route", "nobody"]) == 2
    assert capsys.readouterr().err.strip() == "kefu: route: no live node"


def test_redact_hides_passwords_and_queries() -> None:
    assert redact_url(DATABASE) == "postgresql://kefu:***@127.0.0.1:5499/kefu"
    assert redact_url("redis://:pw@h1:1,h2:2/0") == "redis://:***@h1:1,h2:2/0"
    assert redact_url("https://u:p@hooks.example/in?token=t#x") == "https://u:***@hooks.example/in"
    assert redact_url("postgresql://h/db?password=p") == "postgresql://h/db"
    assert redact_url("not a url") == "not a url"
    assert (
        redact_url("postgresql://postgres@127.0.0.1/kefu") == "postgresql://postgres@127.0.0.1/kefu"
    )


def test_cluster_up_builds_its_plan_from_the_flags(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plans: list[local.Plan] = []
    clean_env.setattr(local, "up", lambda plan: plans.append(plan) or 0)
    assert main(["cluster", "up"]) == 0
    # the defaults, and the secret as kefu token and kefu serve resolve it
    assert plans[-1] == local.Plan(directory=Path("cluster"), nodes=3, jwt_secret="x" * 40)
    clean_env.delenv("KEFU_JWT_SECRET")
    assert main(["cluster", "up"]) == 0
    assert plans[-1].jwt_secret == ""  # none configured: up generates one into DIR
    conf = tmp_path / "kefu.toml"
    conf.write_text("[cluster]\nnode_heartbeat = 0.5\nnode_ttl = 2\n")
    argv = ["cluster", "up", "--nodes", "2", "--base-port", "9100", "--dir", str(tmp_path)]
    argv += ["--redis-url", REDIS, "--database-url", DATABASE, "--config", str(conf)]
    argv += ["--set", "node_heartbeat=0.25", "--set", "max_page=50", "--timeout", "9"]
    assert main(argv) == 0
    assert plans[-1] == local.Plan(
        directory=tmp_path,
        nodes=2,
        base_port=9100,
        redis_url=REDIS,
        database_url=DATABASE,
        config_file=conf,
        settings=("node_heartbeat=0.25", "max_page=50"),
        timeout=9.0,
        heartbeat=0.25,
    )
    conf.write_text('jwt_secret = "from-the-file-0123456789-0123456789"\n')
    assert main(["cluster", "up", "--config", str(conf)]) == 0
    assert plans[-1].jwt_secret == "from-the-file-0123456789-0123456789"
    assert not list(tmp_path.glob("**/dev-jwt-secret"))  # no dev secret made on the way


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--nodes", "0"], "--nodes must be 1..100"),
        (["--nodes", "3", "--base-port", "65534"], "--base-port"),
        (["--base-port", "0"], "--base-port"),
        (["--timeout", "0"], "--timeout must be positive"),
        (["--set", "no_such_setting=1"], "unknown setting 'no_such_setting'"),
        (["--set", "node_ttl=0.1"], "node_heartbeat < node_ttl"),
        (["--redis-url", "localhost:6379"], "redis_url must be a redis:// URL"),
    ],
)
def test_cluster_up_refuses_bad_arguments_before_starting_anything(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    error: str,
) -> None:
    clean_env.setattr(local, "up", lambda plan: pytest.fail("must not start"))
    assert main(["cluster", "up", *args]) == 2
    assert error in capsys.readouterr().err


def test_cluster_down_passes_the_directory_and_grace(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[Path, float]] = []
    clean_env.setattr(local, "down", lambda d, *, grace: calls.append((d, grace)) or 0)
    assert main(["cluster", "down"]) == 0
    assert main(["cluster", "down", "--dir", str(tmp_path), "--grace", "3"]) == 0
    assert calls == [(Path("cluster"), 20.0), (tmp_path, 3.0)]
    with pytest.raises(SystemExit):
        main(["cluster"])  # up or down is required


def test_cluster_down_with_nothing_running(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["cluster", "down", "--dir", str(tmp_path)]) == 0
    assert "nothing runs in" in capsys.readouterr().out
    pids = tmp_path / "pids"
    pids.mkdir()
    (pids / "node-0.pid").write_text("999999999 1\n")  # no such process: a stale file
    (pids / "redis.pid").write_text("garbage\n")
    assert main(["cluster", "down", "--dir", str(tmp_path)]) == 0
    assert not list(pids.iterdir())
