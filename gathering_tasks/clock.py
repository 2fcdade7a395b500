"""The host clock, in one place (liveness uses the database clock: ``db.sql.Sql.now``)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
