"""Tenants' own escalation policies (PUT /policies/{name}), versioned and never deleted; and the one
rule for which policy an incident escalates by, the tenant's or the policy file's."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, DateTime, Row, String, bindparam, func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column

from models.db import Base, JSONType
from models.incident import Incident
from models.policy import MAX_POLICIES, Policy, PolicySet, parse_policy

# A tenant's own policies at most (besides the file's): as many as a policy file may hold.
MAX_TENANT_POLICIES = MAX_POLICIES
PRIMARY_KEY = "pk_tenant_policies"


class TenantPolicy(Base):
    """One version of a tenant's policy. Each PUT adds the next version; DELETE marks the latest one
    deleted. Rows are never deleted (a trigger refuses it): incidents record the version they
    escalated by."""

    __tablename__ = "tenant_policies"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    # In the policy file's notation, normalised ({"levels": [{"delay": "5m", "notify": [...]}]}), and
    # read back through the file's parser: one definition of a valid policy.
    body: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (CheckConstraint("version >= 1", name="version_positive"),)

    def policy(self) -> Policy:
        """The stored policy, parsed as the file's are."""
        return _parsed(self)


def _parsed(row) -> Policy:
    """A stored version (the ORM object, or a row of its columns) parsed as the file's policies are."""
    return parse_policy(row.name, row.body, f"tenant {row.tenant!r}", f"{row.name} version {row.version}")


class TooManyPolicies(Exception):
    """The tenant has MAX_TENANT_POLICIES policies of its own: a policy of a new name is refused."""


# Built once: every escalate request runs it (models/engine.py says why). As a row of columns on
# the session's connection for find(), which only reads it (the ORM's loading of an entity cost more
# than the statement); as the entity for put() and delete(), which change it.
_COLUMNS = TenantPolicy.__table__.c
_LATEST_ROW = (
    select(*_COLUMNS)
    .where(_COLUMNS.tenant == bindparam("tenant"), _COLUMNS.name == bindparam("name"))
    .order_by(_COLUMNS.version.desc())
    .limit(1)
)
_LATEST = select(TenantPolicy).from_statement(_LATEST_ROW)
_LATEST_LOCKED = select(TenantPolicy).from_statement(_LATEST_ROW.with_for_update())


def latest(session: Session, tenant: str, name: str, *, lock: bool = False) -> TenantPolicy | None:
    """The latest version of the tenant's policy `name`, deleted or not; None if it never had one."""
    stmt = _LATEST_LOCKED if lock else _LATEST
    return session.scalars(stmt, {"tenant": tenant, "name": name}).one_or_none()


def current(session: Session, tenant: str) -> list[TenantPolicy]:
    """The tenant's own policies, by name: the latest version of each, unless it is deleted."""
    newest = (
        select(TenantPolicy)
        .where(TenantPolicy.tenant == tenant)
        .ext(distinct_on(TenantPolicy.name))
        .order_by(TenantPolicy.name, TenantPolicy.version.desc())
        .subquery()
    )
    row = aliased(TenantPolicy, newest)
    return list(session.scalars(select(row).where(row.deleted_at.is_(None)).order_by(row.name)))


def put(session: Session, tenant: str, policy: Policy) -> tuple[TenantPolicy, bool]:
    """Store `policy` as the next version of the tenant's policy of its name. Returns (row, created):
    created when the tenant had no policy of that name (never, or deleted). Raises TooManyPolicies
    for a new name past MAX_TENANT_POLICIES, counted without a lock: PUTs racing past it may each
    add one."""
    while True:
        previous = latest(session, tenant, policy.name)
        created = previous is None or previous.deleted_at is not None
        if created and len(current(session, tenant)) >= MAX_TENANT_POLICIES:
            raise TooManyPolicies
        row = TenantPolicy(
            tenant=tenant,
            name=policy.name,
            version=previous.version + 1 if previous else 1,
            body=policy.as_body(),
        )
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()  # INSERT ... RETURNING created_at
        except IntegrityError as exc:
            if exc.orig.diag.constraint_name != PRIMARY_KEY:
                raise
            continue  # a PUT racing this one took that version number: take the next
        return row, created


def delete(session: Session, tenant: str, name: str) -> bool:
    """Mark the tenant's policy `name` deleted (its versions stay); False when it has none."""
    row = latest(session, tenant, name, lock=True)
    if row is None or row.deleted_at is not None:
        return False
    row.deleted_at = func.now()
    return True


def find(session: Session, policies: PolicySet, tenant: str, name: str) -> tuple[Policy, Row | None] | None:
    """What `name` means to the tenant: its own policy of that name (with its row of columns, for its
    version), which shadows the file's of the same name; else the file's (row None); None when
    neither has it."""
    own = session.connection().execute(_LATEST_ROW, {"tenant": tenant, "name": name}).one_or_none()
    if own is not None and own.deleted_at is None:
        return _parsed(own), own
    if name in policies.policies:
        return policies.policies[name], None
    return None


def escalation_policy(session: Session, policies: PolicySet, incident: Incident) -> tuple[Policy, Row | None]:
    """The policy an incident escalates by (and the tenant's row, when it is the tenant's own): the one
    it names, else the one its severity maps to, else the default; each name the tenant's own first."""
    name = policies.name_for(incident.policy, incident.severity)
    # An incident whose policy has since been deleted by its tenant, or removed from the file, still
    # escalates, by the default policy: an escalation that silently never starts is the worst outcome.
    return find(session, policies, incident.tenant, name) or find(
        session, policies, incident.tenant, policies.default
    )
