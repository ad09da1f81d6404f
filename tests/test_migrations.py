"""Migrations on a database of their own: upgrade head on an empty database, downgrade base and up
again, every step both ways, no drift between the models and the migrations, exactly one head."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, pool, text

from models import Base
from models.db import normalize_database_url
from tests.conftest import SERVER_URL, alembic_config
from tests.support import servers

TABLES_0005 = {"incidents", "incident_events", "api_keys", "escalations", "contacts", "notifications"}
TABLES_0006 = TABLES_0005 | {"metrics_rollup", "metrics_rollup_notifications"}
TABLES = TABLES_0006 | {"tenant_policies"}
TABLES_0003 = {"incidents", "incident_events", "api_keys", "escalations"}


@pytest.fixture(scope="module")
def fresh_url():
    """A database created for this module alone, dropped afterwards."""
    name = f"incidents_migrations_{uuid.uuid4().hex[:8]}"
    servers.create_database(SERVER_URL, name)
    try:
        yield servers.with_database(SERVER_URL, name)
    finally:
        servers.drop_database(SERVER_URL, name)


@pytest.fixture(scope="module")
def cfg(fresh_url):
    return alembic_config(fresh_url)


@pytest.fixture(scope="module")
def db(fresh_url):
    engine = create_engine(normalize_database_url(fresh_url), poolclass=pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def script(cfg):
    return ScriptDirectory.from_config(cfg)


def tables(db) -> set[str]:
    return set(inspect(db).get_table_names())


def revision(db) -> str | None:
    with db.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def triggers(db) -> set[tuple[str, str]]:
    with db.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal "
                    "ORDER BY tgname"
                )
            ).all()
        )


def functions(db) -> set[str]:
    with db.connect() as conn:
        return set(
            conn.scalars(
                text(
                    "SELECT proname FROM pg_proc JOIN pg_namespace n ON n.oid = pronamespace "
                    "WHERE nspname = 'public'"
                )
            )
        )


def test_exactly_one_head(script):
    heads = script.get_heads()
    assert heads == ["0010"]
    # A straight line from base to head, each revision naming the one before.
    chain = [rev.revision for rev in script.walk_revisions("base", "heads")]
    assert chain == ["0010", "0009", "0008", "0007", "0006", "0005", "0004", "0003", "0002", "0001"]
    assert script.get_revision("0001").down_revision is None
    assert script.get_revision("0002").down_revision == "0001"
    assert script.get_revision("0003").down_revision == "0002"
    assert script.get_revision("0004").down_revision == "0003"
    assert script.get_revision("0005").down_revision == "0004"
    assert script.get_revision("0006").down_revision == "0005"
    assert script.get_revision("0007").down_revision == "0006"
    assert script.get_revision("0008").down_revision == "0007"
    assert script.get_revision("0009").down_revision == "0008"
    assert script.get_revision("0010").down_revision == "0009"
    assert script.get_bases() == ["0001"]


def test_upgrade_head_on_an_empty_database_then_down_to_base_and_up_again(cfg, db, script):
    assert tables(db) == set()

    command.upgrade(cfg, "head")
    assert tables(db) == TABLES | {"alembic_version"}
    assert revision(db) == script.get_current_head()
    assert triggers(db) == {
        ("incident_events_append_only", "incident_events"),
        ("escalations_never_deleted", "escalations"),
        ("incident_events_never_truncated", "incident_events"),
        ("escalations_never_truncated", "escalations"),
        ("notifications_never_deleted", "notifications"),
        ("notifications_never_truncated", "notifications"),
        ("contacts_never_deleted", "contacts"),
        ("contacts_never_truncated", "contacts"),
        ("tenant_policies_never_deleted", "tenant_policies"),
        ("tenant_policies_never_truncated", "tenant_policies"),
    }
    assert functions(db) == {"forbid_change"}

    command.downgrade(cfg, "base")
    assert tables(db) == {"alembic_version"}
    assert revision(db) is None
    assert triggers(db) == set()
    assert functions(db) == set()

    command.upgrade(cfg, "head")
    assert tables(db) == TABLES | {"alembic_version"}
    assert revision(db) == "0010"


def test_every_step_up_and_down(cfg, db, script):
    """The stairway: each revision upgrades, downgrades and upgrades again from its predecessor."""
    command.downgrade(cfg, "base")
    revisions = [rev.revision for rev in reversed(list(script.walk_revisions("base", "heads")))]
    expected_tables = {
        "0001": {"incidents", "incident_events", "api_keys"},
        "0002": TABLES_0003,
        "0003": TABLES_0003,
        "0004": TABLES_0005,
        "0005": TABLES_0005,
        "0006": TABLES_0006,
        "0007": TABLES,
        "0008": TABLES,
        "0009": TABLES,
        "0010": TABLES,
    }
    previous = "base"
    for rev in revisions:
        command.upgrade(cfg, rev)
        assert revision(db) == rev
        assert tables(db) - {"alembic_version"} == expected_tables[rev]
        command.downgrade(cfg, previous)
        assert revision(db) == (None if previous == "base" else previous)
        command.upgrade(cfg, rev)
        previous = rev
    assert revision(db) == "0010"


def test_upgrade_keeps_existing_rows(cfg, db):
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0001")
    incident_id = uuid.uuid4()
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO incidents (id, tenant, title, description, severity, state) "
                "VALUES (:id, 'acme', 'kept', '', 'high', 'OPEN')"
            ),
            {"id": incident_id},
        )
    command.upgrade(cfg, "head")
    with db.connect() as conn:
        assert conn.scalar(text("SELECT title FROM incidents WHERE id = :id"), {"id": incident_id}) == "kept"
        # And the new table takes rows that refer to it.
        conn.execute(
            text(
                "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at) "
                "VALUES (:eid, :id, 1, 'PENDING', '[]', now())"
            ),
            {"eid": uuid.uuid4(), "id": incident_id},
        )
        conn.rollback()


def test_report_counts_come_from_the_timeline_of_incidents_reported_before(cfg, db):
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0004")
    incident_id, quiet_id = uuid.uuid4(), uuid.uuid4()
    with db.begin() as conn:
        for iid in (incident_id, quiet_id):
            conn.execute(
                text(
                    "INSERT INTO incidents (id, tenant, title, description, severity, state) "
                    "VALUES (:id, 'acme', 'disk', '', 'high', 'OPEN')"
                ),
                {"id": iid},
            )
        for at in ("2026-11-01T10:00:00Z", "2026-11-01T10:00:05Z"):
            conn.execute(
                text(
                    "INSERT INTO incident_events (incident_id, type, from_state, to_state, at, data) "
                    "VALUES (:id, 'reported_again', 'OPEN', 'OPEN', :at, '{}')"
                ),
                {"id": incident_id, "at": at},
            )
    command.upgrade(cfg, "head")
    with db.connect() as conn:
        rows = dict(
            (row[0], row[1:])
            for row in conn.execute(text("SELECT id, report_count, last_reported_at FROM incidents"))
        )
    assert rows[incident_id][0] == 3 and rows[incident_id][1].isoformat() == "2026-11-01T10:00:05+00:00"
    assert rows[quiet_id] == (1, None)
    with db.connect() as conn:  # the timeline itself is as it was
        assert conn.scalar(text("SELECT count(*) FROM incident_events")) == 2


def test_the_metrics_rollup_starts_at_the_upgrade_before_any_unsent_notification(cfg, db):
    """0006 on a database in use: nothing is folded yet, and the notifications' watermark stays before
    the oldest one still unsent (every row before it must be final: models/metrics.py)."""
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0005")
    with db.begin() as conn:
        for status, created_at in (("SENT", "2026-11-01T10:00:00Z"), ("PENDING", "2026-11-01T11:00:00Z")):
            conn.execute(
                text(
                    "INSERT INTO notifications (id, tenant, channel, type, status, created_at) "
                    "VALUES (:id, 'acme', 'in_app', 'notification.test', :status, :created_at)"
                ),
                {"id": uuid.uuid4(), "status": status, "created_at": created_at},
            )
    command.upgrade(cfg, "head")
    with db.connect() as conn:
        rollup = conn.execute(
            text(
                "SELECT notifications_before, now() - escalations_before < interval '1 minute', "
                "lateness_counts, sweep_at, sweep_runs FROM metrics_rollup"
            )
        ).one()
        assert conn.scalar(text("SELECT count(*) FROM notifications")) == 2
    assert rollup[0].isoformat() == "2026-11-01T11:00:00+00:00"
    assert rollup[1:] == (True, [], None, 0)
    command.downgrade(cfg, "0005")
    assert tables(db) == TABLES_0005 | {"alembic_version"}
    command.upgrade(cfg, "head")


def test_tenant_policies_arrive_without_rewriting_escalations_already_recorded(cfg, db):
    """0007 on a database that holds escalations: every row as it was, no policy version on the
    incidents escalated before (a policy of the file); and back down to 0006 without the new."""
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0006")
    incident_id, escalation_id = uuid.uuid4(), uuid.uuid4()
    levels = '[{"delay_ms": 300000, "notify": ["email"]}]'
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO incidents (id, tenant, title, description, severity, state, policy, "
                "policy_levels) VALUES (:id, 'acme', 'disk', '', 'critical', 'ESCALATING', 'standard', "
                "CAST(:levels AS JSONB))"
            ),
            {"id": incident_id, "levels": levels},
        )
        conn.execute(
            text(
                "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at) "
                "VALUES (:eid, :id, 1, 'EXECUTED', '[\"email\"]', '2026-11-01T10:05:00Z')"
            ),
            {"eid": escalation_id, "id": incident_id},
        )
        before = conn.execute(text("SELECT * FROM escalations")).all()
    command.upgrade(cfg, "0007")
    with db.connect() as conn:
        incident = conn.execute(
            text("SELECT policy, policy_levels, policy_version FROM incidents WHERE id = :id"),
            {"id": incident_id},
        ).one()
        assert conn.execute(text("SELECT * FROM escalations")).all() == before
        assert conn.scalar(text("SELECT count(*) FROM tenant_policies")) == 0
    assert incident == ("standard", [{"delay_ms": 300000, "notify": ["email"]}], None)
    command.downgrade(cfg, "0006")
    assert tables(db) == TABLES_0006 | {"alembic_version"}
    with db.connect() as conn:
        assert conn.execute(text("SELECT * FROM escalations")).all() == before
    command.upgrade(cfg, "head")


def test_rounds_arrive_without_rewriting_escalations_and_a_repeated_one_is_never_downgraded_away(cfg, db):
    """0008 on a database that holds escalations: each one of round 1, its incident repeating nothing,
    nothing else changed; a second round of a level is then allowed, and a downgrade that would lose
    it is refused (and, without one, the old rule comes back)."""
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0007")
    incident_id = uuid.uuid4()
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO incidents (id, tenant, title, description, severity, state, policy_levels) "
                "VALUES (:id, 'acme', 'disk', '', 'high', 'ESCALATING', CAST(:levels AS JSONB))"
            ),
            {"id": incident_id, "levels": '[{"delay_ms": 1000, "notify": []}]'},
        )
        conn.execute(
            text(
                "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at) "
                "VALUES (gen_random_uuid(), :id, 1, 'EXECUTED', '[]', '2026-11-01T10:05:00Z')"
            ),
            {"id": incident_id},
        )
        columns = "id, incident_id, escalation_level, status, notify, scheduled_at, executed_at, created_at"
        before = conn.execute(text(f"SELECT {columns} FROM escalations")).all()
    command.upgrade(cfg, "0008")
    second_round = text(
        "INSERT INTO escalations (id, incident_id, round, escalation_level, status, notify, scheduled_at) "
        "VALUES (gen_random_uuid(), :id, 2, 1, 'PENDING', '[]', now())"
    )
    with db.begin() as conn:
        assert conn.execute(text(f"SELECT {columns} FROM escalations")).all() == before
        assert conn.execute(text("SELECT round FROM escalations")).scalars().all() == [1]
        assert conn.scalar(text("SELECT policy_repeat FROM incidents")) == 0
        conn.execute(second_round, {"id": incident_id})
    with pytest.raises(RuntimeError, match="1 escalation"):
        command.downgrade(cfg, "0007")
    assert revision(db) == "0008"
    # Without a second round (the row made level 2 of round 1), it goes down: the old rule is back.
    with db.begin() as conn:
        conn.execute(text("UPDATE escalations SET round = 1, escalation_level = 2 WHERE round = 2"))
    command.downgrade(cfg, "0007")
    with db.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM escalations")) == 2
    assert "uq_escalations_incident_id_escalation_level" in {
        u["name"] for u in inspect(db).get_unique_constraints("escalations")
    }
    command.upgrade(cfg, "head")


def test_no_drift_between_models_and_migrations(cfg, db):
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
    with db.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diffs == []
    # The same through Alembic's own command (what `alembic check` runs): raises on any difference.
    command.check(cfg)


def test_drift_would_be_noticed(cfg, db):
    """The drift check can fail: a column the models lack is reported."""
    command.upgrade(cfg, "head")
    with db.begin() as conn:
        conn.execute(text("ALTER TABLE incidents ADD COLUMN stray integer"))
    try:
        with db.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [(d[0], d[3].name) for d in diffs] == [("remove_column", "stray")]
    finally:
        with db.begin() as conn:
            conn.execute(text("ALTER TABLE incidents DROP COLUMN stray"))


def test_constraints_as_the_models_name_them(cfg, db):
    command.upgrade(cfg, "head")
    insp = inspect(db)
    assert insp.get_pk_constraint("escalations")["name"] == "pk_escalations"
    assert {u["name"]: u["column_names"] for u in insp.get_unique_constraints("escalations")} == {
        "uq_escalations_incident_id_round_escalation_level": ["incident_id", "round", "escalation_level"]
    }
    indexes = {i["name"]: i for i in insp.get_indexes("escalations")}
    assert indexes["ix_escalations_pending_scheduled_at"]["column_names"] == ["scheduled_at"]
    assert "status" in indexes["ix_escalations_pending_scheduled_at"]["dialect_options"]["postgresql_where"]
    assert {fk["name"] for fk in insp.get_foreign_keys("incident_events")} == {
        "fk_incident_events_incident_id_incidents"
    }
    # Enums are strings with CHECK constraints, not native Postgres enums.
    with db.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM pg_type WHERE typtype = 'e'")) == 0
    checks = {c["name"] for c in insp.get_check_constraints("incidents")}
    assert {"ck_incidents_severity", "ck_incidents_incident_state"} <= checks
