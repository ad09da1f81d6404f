"""Operator commands: `flask --app api keys ...` and `flask --app api policy check`."""

from __future__ import annotations

import uuid

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from models.api_key import ApiKey, Scope, hash_key, new_key
from models.policy import PolicyError, format_duration, load_policies

keys = AppGroup("keys", help="Create, list and revoke API keys.")
policy = AppGroup("policy", help="Check escalation policy files.")


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


@policy.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def check_policy(file: str | None) -> None:
    """Validate a policy file (default: the one in force) and print each policy's timeline."""
    path = file or str(current_app.config["SETTINGS"].policy_file)
    try:
        policies = load_policies(path)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path}: OK, default policy {policies.default!r}")
    for name, pol in policies.policies.items():
        click.echo(f"{name}:")
        elapsed = 0
        for number, level in enumerate(pol.levels, start=1):
            elapsed += level.delay_ms
            click.echo(
                f"  level {number}: +{format_duration(level.delay_ms):>6} "
                f"(at {format_duration(elapsed)} after escalation) -> {', '.join(level.notify) or '-'}"
            )
