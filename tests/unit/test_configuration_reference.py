"""docs/configuration.md is generated from the settings model, and stays in sync with it."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
from pydantic.fields import FieldInfo

from gathering_tasks import settings_doc
from gathering_tasks.settings import Settings
from gathering_tasks.settings_doc import REGENERATE, reference_markdown

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"


def test_the_reference_page_is_what_the_settings_model_generates():
    # Given the committed page, When the reference is generated from the model
    committed = PAGE.read_text()
    generated = reference_markdown()
    # Then they are the same text
    if committed != generated:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    generated.splitlines(keepends=True),
                    "docs/configuration.md",
                    "generated",
                )
            )[:40]
        )
        pytest.fail(f"docs/configuration.md is out of date; regenerate it: {REGENERATE}\n{diff}")


def test_every_setting_has_a_description_and_is_listed_under_its_variable():
    page = reference_markdown()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert f"| `{settings_doc.env_var(name)}` |" in page
    for name, computed in Settings.model_computed_fields.items():
        assert computed.description, f"{name} has no description"
        assert f"| `{name}` |" in page
    # The alias is the variable; the field's own name is not one
    assert "`GATHERING_BROKER_URL`" in page and "GATHERING_BROKER_URL_OVERRIDE" not in page


def test_the_reference_does_not_depend_on_this_machine(monkeypatch: pytest.MonkeyPatch):
    # Given an environment that sets machine-specific values, secrets among them
    before = reference_markdown()
    monkeypatch.setenv("GATHERING_HOME", "/srv/odd-home")
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/odd-xdg")
    monkeypatch.setenv("GATHERING_REDIS_URL", "redis://:redis-secret@10.9.9.9:6379/0")
    monkeypatch.setenv("GATHERING_SMTP_PASSWORD", "smtp-secret")
    # When the reference is generated again
    after = reference_markdown()
    # Then it is the same text, with the documented rule for the database's default
    assert after == before
    for value in ("/srv/odd", "redis-secret", "smtp-secret", str(Path.home())):
        assert value not in after
    assert "| `sqlite:///$GATHERING_HOME/gathering.db` |" in after


def test_types_bounds_defaults_and_the_derived_values_are_rendered():
    rows = {
        line.split(" | ")[0].strip("| `"): line.split(" | ")
        for line in reference_markdown().splitlines()
        if line.startswith("| `")
    }
    assert rows["GATHERING_BEAT_TICK_S"][1:3] == ["number, > 0, <= 60", "1"]
    assert rows["GATHERING_SMTP_SECURITY"][1:3] == [
        "one of `starttls`, `ssl`, `none`",
        "`starttls`",
    ]
    assert rows["GATHERING_SMTP_PASSWORD"][1:3] == ["secret (shown as `(secret)`)", "unset"]
    assert rows["GATHERING_HTTP_ALLOW_NETWORKS"][1:3] == ["list of text", "empty"]
    assert rows["GATHERING_CONSUME_CELERY_QUEUE"][1:3] == ["boolean", "`true`"]
    assert rows["visibility_timeout_s"][1] == "630"
    assert rows["lock_ttl_s"][1] == "330"
    assert rows["heartbeat_interval_s"][1] == "10"
    assert rows["broker_url"][1] == "`redis://127.0.0.1:6379/0`"


def test_a_setting_left_out_of_the_groups_or_without_a_description_stops_generation(
    monkeypatch: pytest.MonkeyPatch,
):
    # Given the groups without one setting
    groups = tuple(
        (title, tuple(n for n in names if n != "beat_tick_s"))
        for title, names in settings_doc.GROUPS
    )
    monkeypatch.setattr(settings_doc, "GROUPS", groups)
    # Then the page cannot be generated, and the error names it
    with pytest.raises(ValueError, match="beat_tick_s"):
        reference_markdown()
    # And a field without a description is refused by name
    with pytest.raises(ValueError, match="no description"):
        settings_doc._description("new_setting", FieldInfo())
