"""``gathering-tasks config``: the effective settings with secrets masked, the reference page,
and an invalid setting named by its variable."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli_runner import ROOT, cli

SECRETS = ("hunter2-smtp", "pg-password", "broker-password")


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATHERING_")}
    return {**env, "PYTHONPATH": str(ROOT), **values}


def test_show_prints_every_setting_with_its_source_and_no_secret(tmp_path: Path):
    # Given settings from the environment, three of them holding secrets
    env = _env(
        GATHERING_HOME=str(tmp_path),
        GATHERING_SMTP_PASSWORD="hunter2-smtp",
        GATHERING_DATABASE_URL="postgresql+psycopg2://app:pg-password@127.0.0.1:5432/db",
        GATHERING_BROKER_URL="redis://:broker-password@127.0.0.1:6390/1",
        GATHERING_BEAT_TICK_S="2.5",
    )
    # When they are shown, as text and as JSON
    text = cli(env, "config", "show")
    as_json = cli(env, "config", "show", "--json")
    assert text.returncode == 0 and as_json.returncode == 0, (text.stderr, as_json.stderr)
    # Then no secret appears anywhere
    for secret in SECRETS:
        assert secret not in text.stdout + text.stderr + as_json.stdout + as_json.stderr
    # And each setting is listed with its value and where it came from
    rows = {row["variable"]: row for row in json.loads(as_json.stdout)}
    assert rows["GATHERING_BEAT_TICK_S"] == {
        "variable": "GATHERING_BEAT_TICK_S",
        "field": "beat_tick_s",
        "value": 2.5,
        "source": "environment",
    }
    assert rows["GATHERING_SMTP_PASSWORD"]["value"] == "(secret)"
    assert rows["GATHERING_DATABASE_URL"]["value"] == (
        "postgresql+psycopg2://app:***@127.0.0.1:5432/db"
    )
    assert rows["broker_url"] == {
        "variable": "broker_url",
        "field": "broker_url",
        "value": "redis://:***@127.0.0.1:6390/1",
        "source": "derived",
    }
    assert rows["GATHERING_TASK_TIME_LIMIT_S"]["source"] == "default"
    assert rows["GATHERING_SMTP_HOST"]["value"] is None
    lines = {line.split()[0]: line.split()[1:] for line in text.stdout.splitlines()}
    assert lines["GATHERING_BEAT_TICK_S"] == ["2.5", "(environment)"]
    assert lines["GATHERING_SMTP_PASSWORD"] == ["(secret)", "(environment)"]
    assert lines["GATHERING_SMTP_HOST"] == ["unset", "(default)"]
    assert lines["visibility_timeout_s"] == ["630", "(derived)"]


def test_an_invalid_setting_is_one_line_naming_its_variable():
    for variable, value in (
        ("GATHERING_BEAT_TICK_S", "soon"),
        ("GATHERING_SMTP_SECURITY", "tls-please"),
    ):
        # When any command starts with an invalid setting
        for args in (("config", "show"), ("actions", "list")):
            result = cli(_env(**{variable: value}), *args)
            # Then it stops with exit 2 and one line that names the variable
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {variable}: "), lines


def test_config_commands_do_not_import_user_modules():
    # Given a user module that cannot be imported
    env = _env(GATHERING_IMPORTS="no_such_module_here")
    # Then the settings can still be shown (and other commands name the problem)
    shown = cli(env, "config", "show")
    assert shown.returncode == 0, shown.stderr
    assert "GATHERING_IMPORTS" in shown.stdout and "no_such_module_here" in shown.stdout
    refused = cli(env, "actions", "list")
    assert refused.returncode == 2 and "GATHERING_IMPORTS" in refused.stderr


def test_reference_prints_or_writes_the_page(tmp_path: Path):
    printed = cli(_env(), "config", "reference")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == (ROOT / "docs" / "configuration.md").read_text()
    target = tmp_path / "configuration.md"
    written = cli(_env(), "config", "reference", "--output", str(target))
    assert written.returncode == 0 and target.read_text() == printed.stdout
