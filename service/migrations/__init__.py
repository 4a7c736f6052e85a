"""Alembic migrations of the API's tables, run programmatically (no alembic.ini at run time)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

from model.wording import first_line

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(engine: Engine) -> Config:
    """An Alembic Config pointing at this folder and bound to ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database behind ``engine`` to ``revision`` (default: the newest)."""
    _run(command.upgrade, engine, revision)


class UnusableDatabaseError(RuntimeError):
    """A database winback cannot use (no engine for its URL, or it does not answer at start); the one line says
    why and what to do."""


def upgrade_at_start(url: str, make_engine: Callable[[str], Engine], who: str) -> None:
    """Bring the database at ``url`` up to date once, before ``who`` (a scorer, the executor) starts its workers.

    UnusableDatabaseError, in one line with the URL's password hidden, when no engine can be built for ``url`` (a
    scheme SQLAlchemy does not know, a driver that is not installed, a port that is no number: a traceback before)
    or when the database does not answer (a process that cannot create its tables cannot start; once started, the
    scorer and the executor ride out an outage).
    """
    from service.api.store import shown_url

    engine = engine_for(url, make_engine)
    try:
        upgrade(engine)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as error:
        raise UnusableDatabaseError(
            f"the database {shown_url(url)} is unavailable ({first_line(error.orig or error)}): {who} needs it "
            "once at start to bring its tables up to date; start it again when the database answers (once "
            "started, it keeps working through outages)"
        ) from None
    finally:
        engine.dispose()


def engine_for(url: str, make_engine: Callable[[str], Engine] = sa.create_engine) -> Engine:
    """``make_engine(url)`` (which connects to nothing yet), or UnusableDatabaseError in one line, the URL's
    password hidden, when no engine can be built for it: a scheme SQLAlchemy does not know, a driver that is not
    installed, a port that is no number (each a traceback from the commands before)."""
    from service.api.store import shown_url

    try:
        return make_engine(url)
    except (sa.exc.ArgumentError, ImportError, ValueError) as error:
        try:
            where = shown_url(url)
        except (sa.exc.ArgumentError, ValueError):  # no URL SQLAlchemy can read, so none it can hide a password in
            where = "URL given"
        raise UnusableDatabaseError(
            f"cannot use the database {where} ({first_line(error)}): winback keeps its state in SQLite or "
            "PostgreSQL, e.g. sqlite:///winback.db or postgresql+psycopg://user@host/winback"
        ) from None


def downgrade(engine: Engine, revision: str) -> None:
    """Take the database behind ``engine`` back to ``revision``."""
    _run(command.downgrade, engine, revision)


def _run(step: Callable[[Config, str], None], engine: Engine, revision: str) -> None:
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        step(config, revision)
