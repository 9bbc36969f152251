//! Statehouse: Durable-Object-style state for ordinary stateless servers.
//!
//! A request reads top to bottom through: `http` (routes, extractors, errors)
//! → `routing` (commit here, or hand the write to the replica that owns the object)
//! → `guard` (who owns the object: its lease and fence)
//! → `writer` (the one write path: batched transactions, one commit for many writes)
//! → `objects` (the SQL of a fenced change) → `db` (libSQL, local or remote).

pub mod alarms;
pub mod analytics;
pub mod auth;
pub mod blobs;
pub mod clock;
pub mod config;
pub mod db;
pub mod guard;
pub mod headers;
pub mod http;
pub mod limits;
pub mod model;
pub mod objects;
pub mod resident;
pub mod routing;
pub mod server;
pub mod telemetry;
pub mod threads;
pub mod writer;
