"""Alembic migrations of the service's database (``service.db.init_db`` runs them to head)."""
