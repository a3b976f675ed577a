//! The Virtual Infrastructure Manager. `vimd` keeps the inventory in a database (the source of
//! truth), takes API calls, and turns them into jobs that travel through NATS JetStream to its
//! workers and on to the host agents (docs/protocol.md).

// The OpenAPI document is one json! literal, deeper than the default limit allows.
#![recursion_limit = "256"]

pub mod api;
pub mod audit;
pub mod auth;
pub mod balance;
pub mod billing;
pub mod db;
pub mod files;
pub mod hosts;
pub mod http;
pub mod join;
pub mod leader;
pub mod metrics;
pub mod monitor;
pub mod openapi;
pub mod outbox;
pub mod placement;
pub mod queue;
pub mod server;
pub mod sla;
pub mod tls;
pub mod ui;
pub mod webhooks;

/// Locks a mutex, going on with its data if a thread panicked while holding it (the data are
/// plain maps and sets that a panic cannot leave half-changed).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
