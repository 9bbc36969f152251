//! Statehouse: Durable-Object-style state for ordinary stateless servers.
//!
//! A request reads top to bottom through: `http` (routes, extractors, errors)
//! → `guard` (who owns the object: lease, fence, or forward to the owner)
//! → `writer` (the one write path: batched transactions, one commit for many writes)
//! → `objects` (the SQL of a fenced change) → `db` (libSQL, local or remote).

pub mod analytics;
pub mod auth;
pub mod blobs;
pub mod clock;
pub mod config;
pub mod db;
pub mod guard;
pub mod http;
pub mod limits;
pub mod model;
pub mod objects;
pub mod resident;
pub mod server;
pub mod telemetry;
pub mod threads;
pub mod writer;
