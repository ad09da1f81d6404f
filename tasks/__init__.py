"""Celery: the app factory (tasks.celery), the tasks (tasks.escalation), the entry point (tasks.app)."""
