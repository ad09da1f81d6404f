"""Engine steps the unit tests share, called as the API calls them."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from models import engine
from models.engine import EngineSettings, Outbox
from models.incident import Incident
from models.lifecycle import Action
from models.policy import PolicySet


def escalate_new(session: Session, tenant: str, policies: PolicySet, settings: EngineSettings) -> Incident:
    """Report a new incident of the tenant and escalate it, in the caller's transaction."""
    incident, _ = engine.report(
        session, Incident(id=uuid.uuid4(), tenant=tenant, title="Disk full"), actor=None
    )
    engine.transition(
        session, incident, Action.ESCALATE, actor=None, policies=policies, settings=settings, outbox=Outbox()
    )
    return incident
