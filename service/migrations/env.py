"""Alembic's environment: the service's models are the target, the connection comes from the caller.

:func:`service.db.init_db` runs ``alembic upgrade head`` in the process, handing its connection over
in ``config.attributes["connection"]`` (in a transaction it holds). From the command line
(``alembic -c alembic.ini revision --autogenerate -m "..."``, ``alembic upgrade head``) the database
is the one of the settings (``MAML_DATABASE_URL``, else the SQLite file under ``MAML_DATA_DIR``).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from service.config import get_settings
from service.db import Base, make_engine, migrating

config = context.config


def run(connection: Connection) -> None:
    # SQLite cannot alter most of a table in place: batch mode rebuilds it (copy, drop, rename).
    # The caller's transaction (service.db.migrating) holds every statement, DDL included, on SQLite too.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True,
                      transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
elif context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = make_engine(get_settings())
    try:
        with migrating(engine) as conn:  # as init_db does: one transaction, one migrating process
            run(conn)
    finally:
        engine.dispose()
