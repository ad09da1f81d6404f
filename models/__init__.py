"""Domain: the state machine, policies, ORM models and the escalation engine's database side."""

from models.api_key import ApiKey, Scope
from models.contact import Contact
from models.db import Base
from models.escalation import Escalation, EscalationStatus
from models.incident import Incident, IncidentEvent
from models.lifecycle import Action, InvalidTransition, State
from models.metrics import MetricsRollup, NotificationRollup
from models.notification import Notification, NotificationStatus, NotificationType
from models.tenant_policy import TenantPolicy

__all__ = [
    "Action",
    "ApiKey",
    "Base",
    "Contact",
    "Escalation",
    "EscalationStatus",
    "Incident",
    "IncidentEvent",
    "InvalidTransition",
    "MetricsRollup",
    "Notification",
    "NotificationRollup",
    "NotificationStatus",
    "NotificationType",
    "Scope",
    "State",
    "TenantPolicy",
]
