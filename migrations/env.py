"""Alembic environment: the database from DATABASE_URL, the schema from models.Base."""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

import models
from models.db import normalize_database_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = models.Base.metadata


def database_url() -> str:
    return normalize_database_url(
        config.attributes.get("database_url")
        or os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/incidents")
    )


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
