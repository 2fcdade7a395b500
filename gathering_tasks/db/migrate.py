"""Apply the Alembic migrations: the only way the schema is made or changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from gathering_tasks.db.engine import make_engine


def migrations_dir() -> Path:
    """The ``migrations/`` folder: beside the package in a checkout, inside it in a wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "migrations", here / "_migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("the migrations folder is missing from this installation")


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # '%' would be read as interpolation by configparser (passwords may contain it).
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at ``database_url`` up to ``revision``."""
    _run(database_url, lambda cfg: command.upgrade(cfg, revision))


def downgrade(database_url: str, revision: str) -> None:
    """Take the database at ``database_url`` down to ``revision``."""
    _run(database_url, lambda cfg: command.downgrade(cfg, revision))


def _run(database_url: str, step: Callable[[Config], None]) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # SQLite rebuilds a table to change its constraints; with foreign keys on,
                # dropping the old copy would cascade into the tables that reference it.
                # The switch only works outside a transaction, on the driver connection.
                _pragma(conn, "PRAGMA foreign_keys=OFF")
            try:
                with conn.begin():
                    cfg = alembic_config(database_url)
                    cfg.attributes["connection"] = conn
                    step(cfg)
                    if sqlite:
                        _check_foreign_keys(conn)
            finally:
                if sqlite:
                    _pragma(conn, "PRAGMA foreign_keys=ON")
    finally:
        engine.dispose()


def _pragma(conn: Connection, statement: str) -> None:
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute(statement)


def _check_foreign_keys(conn: Connection) -> None:
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise RuntimeError(f"migration left {len(broken)} row(s) with broken foreign keys")
