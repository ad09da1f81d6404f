"""The contacts resource: who a tenant's escalation levels reach, and their delivery logs.

Thin views, as api/incidents.py: parse -> load -> domain call -> commit -> deliver.
"""

from __future__ import annotations

import uuid

from flask import current_app, g, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from marshmallow import RAISE
from sqlalchemy import select

from api.auth import authenticate
from api.db import db_session
from api.notifications import delivery_log
from api.paging import keyset_page
from api.schemas import (
    ContactCreateSchema,
    ContactPageSchema,
    ContactSchema,
    ContactUpdateSchema,
    ContactWithSecretSchema,
    NotificationPageSchema,
    NotificationSchema,
    PageArgsSchema,
)
from models import notify
from models.addresses import InvalidAddress, normalise
from models.contact import Contact
from models.engine import Outbox, db_now
from models.notification import Notification
from tasks.channels import ChannelSettings
from tasks.channels.webhook import new_secret
from tasks.escalation import deliver

blp = Blueprint("contacts", __name__, url_prefix="/contacts", description="Who escalations reach")
blp.before_request(authenticate)

SIGNED_CHANNELS = ("webhook",)
# Channels whose receivers are machines that want the whole story, not only the page.
STATUS_UPDATES_BY_DEFAULT = ("webhook", "slack")


def _settings() -> ChannelSettings:
    return current_app.extensions["channel_settings"]


def _find(contact_id: uuid.UUID) -> Contact:
    """The caller's tenant's live contact, or 404 (another tenant's, or a deleted one, does not exist)."""
    contact = (
        db_session()
        .scalars(
            select(Contact).where(
                Contact.id == contact_id,
                Contact.tenant == g.api_key.tenant,
                Contact.deleted_at.is_(None),
            )
        )
        .one_or_none()
    )
    if contact is None:
        abort(404, message=f"Contact {contact_id} not found.")
    return contact


def _normalised(channel: str, address: str) -> str:
    try:
        return normalise(channel, address, allow_private_urls=_settings().allow_private_urls)
    except InvalidAddress as exc:
        abort(422, errors={"json": {"address": [str(exc)]}})


def _configured(channel: str) -> None:
    """422 naming the environment variable the server lacks for `channel`, instead of failing at 3 a.m."""
    missing = _settings().missing_for(channel)
    if missing:
        abort(
            422,
            errors={"json": {"channel": [f"This server cannot send {channel}: {missing} is not set."]}},
        )


@blp.route("")
class Contacts(MethodView):
    @blp.arguments(PageArgsSchema(), location="query", unknown=RAISE)
    @blp.response(200, ContactPageSchema)
    def get(self, args):
        """List the tenant's contacts, newest first (keyset pagination: pass next_cursor back as cursor)."""
        stmt = select(Contact).where(Contact.tenant == g.api_key.tenant, Contact.deleted_at.is_(None))
        rows, next_cursor = keyset_page(stmt, (Contact.created_at, Contact.id), args, newest_first=True)
        return {"items": [row.Contact for row in rows], "next_cursor": next_cursor}

    @blp.arguments(ContactCreateSchema())
    @blp.response(201, ContactWithSecretSchema)
    def post(self, data):
        """Add a contact; a webhook contact's signing secret is in this response only."""
        channel = data["channel"]
        _configured(channel)
        session = db_session()
        now = db_now(session)
        contact = Contact(
            id=uuid.uuid4(),
            tenant=g.api_key.tenant,
            name=data["name"],
            channel=channel,
            address=_normalised(channel, data["address"]),
            levels=sorted(data["levels"]) if data["levels"] is not None else None,
            status_updates=(
                data["status_updates"]
                if data["status_updates"] is not None
                else channel in STATUS_UPDATES_BY_DEFAULT
            ),
            enabled=data["enabled"],
            secret=new_secret() if channel in SIGNED_CHANNELS else None,
            created_at=now,
            updated_at=now,
        )
        session.add(contact)
        session.commit()
        return contact, 201, {"Location": url_for("contacts.Contact", contact_id=contact.id)}


@blp.route("/<uuid:contact_id>", endpoint="Contact")
class ContactById(MethodView):
    @blp.response(200, ContactSchema)
    def get(self, contact_id):
        """Read one contact (never its secret)."""
        return _find(contact_id)

    @blp.arguments(ContactUpdateSchema())
    @blp.response(200, ContactSchema)
    def patch(self, data, contact_id):
        """Change a contact's name, address, levels, status_updates or enabled (not its channel)."""
        session = db_session()
        contact = _find(contact_id)
        if "address" in data:
            data["address"] = _normalised(contact.channel, data["address"])
        if data.get("levels") is not None:
            data["levels"] = sorted(data["levels"])
        for name, value in data.items():
            setattr(contact, name, value)
        contact.updated_at = db_now(session)
        session.commit()
        return contact

    @blp.response(204)
    def delete(self, contact_id):
        """Delete a contact: it stops receiving; its delivery history stays in the incidents' logs."""
        session = db_session()
        contact = _find(contact_id)
        # Never a DELETE (the table refuses it): the notifications refer to the row. Pending
        # deliveries to it are SKIPPED by the deliverer, which re-reads the contact under its lock.
        contact.deleted_at = contact.updated_at = db_now(session)
        session.commit()


@blp.route("/<uuid:contact_id>/rotate-secret", methods=["POST"])
@blp.response(200, ContactWithSecretSchema)
def rotate_secret(contact_id):
    """Issue a new signing secret for a webhook contact (in this response only); the old one stops working."""
    session = db_session()
    contact = _find(contact_id)
    if contact.channel not in SIGNED_CHANNELS:
        abort(
            409,
            message=f"Only webhook contacts have a signing secret; this one is an {contact.channel} contact.",
            errors={"channel": [contact.channel]},
        )
    contact.secret = new_secret()
    contact.updated_at = db_now(session)
    session.commit()
    return contact


@blp.route("/<uuid:contact_id>/test", methods=["POST"])
@blp.response(202, NotificationSchema)
def send_test(contact_id):
    """Send the contact a test message now; 202 with the notification (its status tells how it went)."""
    session = db_session()
    contact = _find(contact_id)
    if not contact.enabled:
        # Its deliverer would skip the message: say so now instead of a SKIPPED row later.
        abort(409, message="This contact is disabled: enable it to send it a test message.")
    missing = _settings().missing_for(contact.channel)
    if missing:
        abort(
            409,
            message=f"This server cannot send {contact.channel}: {missing} is not set.",
            errors={"channel": [contact.channel]},
        )
    outbox = Outbox()
    notification = notify.queue_test(session, contact, db_now(session), outbox)
    session.commit()
    deliver(outbox)
    return notification


@blp.route("/<uuid:contact_id>/notifications")
@blp.arguments(PageArgsSchema(), location="query", unknown=RAISE)
@blp.response(200, NotificationPageSchema)
def contact_delivery_log(args, contact_id):
    """The contact's delivery log: every notification sent or meant for it, newest first."""
    _find(contact_id)
    return delivery_log(Notification.contact_id == contact_id, args, newest_first=True)
