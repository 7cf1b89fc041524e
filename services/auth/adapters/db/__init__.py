"""PostgreSQL: Core tables, repositories (SQL in, domain objects out), the outboxes, and the unit of work."""
