"""The declarative Base, the engine and the session factory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import JSON, Insert, MetaData, create_engine, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction, sessionmaker

# Constraint names are fixed from day one so that migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def normalize_database_url(url: str) -> str:
    """Accept Heroku's `postgres://` and spell the driver explicitly."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(url: str, *, pool_size: int = 10, statement_timeout_ms: int = 10_000) -> Engine:
    """An engine whose every wait is bounded, so that a sick database yields a 503, never a hang."""
    return create_engine(
        normalize_database_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=3,
        pool_pre_ping=True,
        # An UPDATE of many rows (a batch of escalations executed in one transaction) goes out in
        # pages of statements, one round trip each, instead of one round trip per row.
        executemany_mode="values_plus_batch",
        # Error logs name the statement, never its values: titles, notes and addresses are the
        # tenants' data.
        hide_parameters=True,
        connect_args={
            "connect_timeout": 2,
            # UTC whatever the server's or database's default time zone: timestamps leave the API
            # as +00:00 on every machine.
            "options": (
                f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={statement_timeout_ms} "
                "-c timezone=UTC"
            ),
            # Notice a dead server on an open connection instead of waiting on TCP for minutes.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 2,
        },
    )


def make_session_factory(engine: Engine) -> sessionmaker:
    """Sessions that keep loaded values after commit (we publish from them after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


# Rows that only ever get inserted (timeline entries, scheduled escalations) are written with one
# Core INSERT per table, not through the ORM's unit of work: its flush (attribute history,
# dependency sort, identity map) cost more CPU than the rest of a create or an escalate request
# (docs/BENCHMARKS.md section 7). They are queued, and written as pending ORM objects are
# autoflushed: before the session's next statement and at commit. So a query sees them, and a
# worker's batch of 100 levels still goes out as one multi-row INSERT per statement.
_QUEUED = "queued_inserts"


def queue_insert(session: Session, statement: Insert, row: dict) -> None:
    """Run `statement` (an INSERT) with `row` before this session's next statement or its commit,
    whichever comes first, in one executemany with the other rows queued for the same statement
    object: they must name the same columns. Inside a savepoint only through savepoint(), which
    writes them before it is released and drops them if it is rolled back."""
    session.info.setdefault(_QUEUED, {}).setdefault(statement, []).append(row)


@contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """session.begin_nested() for work that queues inserts: what was queued before belongs to the
    enclosing transaction and is written first; what is queued inside is written before the
    savepoint is released, or dropped with it when it is rolled back."""
    _write_queued(session)
    try:
        with session.begin_nested():
            yield
            _write_queued(session)
    except BaseException:
        session.info.pop(_QUEUED, None)
        raise


def _write_queued(session: Session) -> None:
    for statement, rows in session.info.pop(_QUEUED, {}).items():
        # Core on the connection, so this does not come back through do_orm_execute.
        session.connection().execute(statement, rows)


@event.listens_for(Session, "do_orm_execute")
def _before_statement(state) -> None:
    _write_queued(state.session)


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    _write_queued(session)


@event.listens_for(Session, "after_transaction_end")
def _drop_queued(session: Session, transaction: SessionTransaction) -> None:
    # Committed: already written. Rolled back: never to be written.
    if transaction.parent is None:
        session.info.pop(_QUEUED, None)
