//! The PostgreSQL store (feature `postgres`): `tokio-postgres` over a
//! `deadpool-postgres` pool, schema in `schema/postgres.sql`.
