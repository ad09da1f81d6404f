"""The worker, beat and Flower entry point: `celery -A tasks.app:celery_app worker`."""

from api import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
