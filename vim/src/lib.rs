//! The Virtual Infrastructure Manager. `vimd` keeps the inventory in a database (the source of
//! truth), takes API calls, and turns them into jobs that travel through NATS JetStream to its
//! workers and on to the host agents (docs/protocol.md).

pub mod api;
pub mod audit;
pub mod auth;
pub mod db;
pub mod monitor;
pub mod openapi;
pub mod outbox;
pub mod placement;
pub mod queue;
pub mod server;
