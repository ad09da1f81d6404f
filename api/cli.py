"""Operator commands: `flask --app api keys ...` and `flask --app api policy check [--tenant T]`."""

from __future__ import annotations

import uuid

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from models import tenant_policy
from models.api_key import ApiKey, Scope, hash_key, new_key
from models.policy import SEVERITIES, Policy, PolicyError, format_elapsed, load_policies
from models.tenant_policy import TenantPolicy

keys = AppGroup("keys", help="Create, list and revoke API keys.")
policy = AppGroup("policy", help="Check escalation policy files (and a tenant's own policies).")


def _max_length(limit: int, allow_blank: bool):
    """A click callback refusing what the api_keys columns cannot hold (instead of a SQL traceback)."""

    def check(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
        if not allow_blank and not value.strip():
            raise click.BadParameter("must not be blank")
        if len(value) > limit:
            raise click.BadParameter(f"at most {limit} characters")
        return value

    return check


@keys.command("create")
@click.option(
    "--tenant",
    required=True,
    callback=_max_length(64, allow_blank=False),
    help="The tenant whose incidents the key may see.",
)
@click.option("--name", default="", callback=_max_length(100, allow_blank=True), help="What the key is for.")
@click.option("--scope", type=click.Choice([s.value for s in Scope]), default="write")
def create_key(tenant: str, name: str, scope: str) -> None:
    """Create a key; the key itself is printed once, as the last line, and never stored."""
    key, prefix = new_key()
    record = ApiKey(
        id=uuid.uuid4(),
        tenant=tenant,
        name=name,
        prefix=prefix,
        secret_hash=hash_key(key),
        scope=Scope(scope),
    )
    with current_app.extensions["db"].begin() as session:
        session.add(record)
    click.echo(f"Created {scope} key {record.id} ({prefix}...) for tenant {tenant!r}.", err=True)
    click.echo("Store it now: it cannot be shown again.", err=True)
    click.echo(key)


@keys.command("list")
@click.option("--tenant", default=None, help="Only this tenant's keys.")
def list_keys(tenant: str | None) -> None:
    """List keys (never their secrets)."""
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if tenant:
        stmt = stmt.where(ApiKey.tenant == tenant)
    with current_app.extensions["db"]() as session:
        for key in session.scalars(stmt):
            revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            click.echo(f"{key.id}  {key.prefix}...  {key.tenant}  {key.scope.value:5}  {revoked}  {key.name}")


@keys.command("revoke")
@click.argument("key_id", type=click.UUID)
def revoke_key(key_id: uuid.UUID) -> None:
    """Revoke a key: it is refused from the next request on."""
    from sqlalchemy import func

    with current_app.extensions["db"].begin() as session:
        key = session.get(ApiKey, key_id, with_for_update=True)
        if key is None:
            raise click.ClickException(f"no key {key_id}")
        if key.revoked_at is None:
            key.revoked_at = func.now()
    click.echo(f"Revoked key {key_id}.")


def _echo_policy(title: str, policy: Policy) -> None:
    click.echo(f"{title}: {policy.timeline()}")
    for number, level in enumerate(policy.levels, start=1):
        click.echo(f"  level {number}, +{format_elapsed(level.delay_ms)}: {', '.join(level.notify) or '-'}")


@policy.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--tenant", default=None, help="Also this tenant's own policies (from the database).")
def check_policy(file: str | None, tenant: str | None) -> None:
    """Validate a policy file (default: the one in force) and print each policy's timeline, and where
    incidents that name no policy go by severity; with --tenant, as that tenant's incidents see them."""
    path = file or str(current_app.config["SETTINGS"].policy_file)
    try:
        policies = load_policies(path)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path}: OK, default policy {policies.default!r}")
    for name, pol in policies.policies.items():
        _echo_policy(name, pol)
    own: dict[str, TenantPolicy] = {}
    if tenant is not None:
        with current_app.extensions["db"]() as session:
            own = {row.name: row for row in tenant_policy.current(session, tenant)}
        click.echo(f"tenant {tenant!r}: {len(own) or 'no'} polic{'y' if len(own) == 1 else 'ies'} of its own")
        for name, row in own.items():
            shadows = " (shadows the file's)" if name in policies.policies else ""
            try:
                _echo_policy(f"{name} version {row.version}{shadows}", row.policy())
            except PolicyError as exc:
                raise click.ClickException(str(exc)) from None
    for severity in SEVERITIES:
        name = policies.name_for(None, severity)
        notes = ["default"] if severity not in policies.severity_policies else []
        if name in own:
            notes.append(f"tenant's version {own[name].version}")
        click.echo(f"severity {severity} -> {name}" + (f" ({'; '.join(notes)})" if notes else ""))
