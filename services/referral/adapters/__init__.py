"""How the referral service talks to the world: PostgreSQL repositories, unit of work, Redis cache."""
