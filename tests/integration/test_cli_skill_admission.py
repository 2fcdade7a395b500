"""The command line refuses, at creation, what a skill's run would refuse (exit 2)."""

from __future__ import annotations

import json

import pytest

from tests.cli_runner import cli


def add_call_api(env: dict[str, str], config: dict[str, object]) -> tuple[int, list[str]]:
    result = cli(
        env, "actions", "add", "--name", "probe", "--type", "call_api",
        "--config", json.dumps(config), "--every", "60",
    )  # fmt: skip
    return result.returncode, result.stderr.strip().splitlines()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_metadata_url_exits_2_naming_the_field(cli_env: dict[str, str]) -> None:
    # When a call_api action on the metadata address is added
    code, lines = add_call_api(cli_env, {"url": "http://169.254.169.254/latest/meta-data/"})

    # Then the CLI exits 2 with one line: the field and the reason the worker would give
    assert code == 2, lines
    assert lines == ["error: config.url: request refused (cloud-metadata): 169.254.169.254"]
    assert cli(cli_env, "actions", "list").stdout == ""


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_secret_outside_the_allowlist_exits_2(cli_env: dict[str, str]) -> None:
    # Given secrets allowed for HOOK_* only
    env = {**cli_env, "GATHERING_SECRET_ENV_ALLOW": "HOOK_*"}
    auth = {"type": "bearer", "token_env": "AWS_SECRET_ACCESS_KEY"}

    # When an action references a cloud credential, then one named by the allowlist
    refused, lines = add_call_api(env, {"url": "https://api.example.com/", "auth": auth})
    accepted, _ = add_call_api(
        env, {"url": "https://api.example.com/", "auth": {**auth, "token_env": "HOOK_TOKEN"}}
    )

    # Then the first exits 2 naming the field, and the second is stored
    assert refused == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: config.auth.token_env: "), lines
    assert accepted == 0
