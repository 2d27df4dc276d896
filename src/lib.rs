//! giftd: a gift-card authorization daemon.
//!
//! # Layout (reading order)
//! - [`model`]: the shared vocabulary: money, currencies, card statuses, result codes.
//! - [`card_number`]: card numbers, and the keyed hash that replaces them at rest.
//! - [`wire`]: protocol v1: framing, typed requests and replies, byte layouts (see `protocol/`).
//! - [`engine`]: every business rule; in-memory cards; no IO of its own (it talks to a [`engine::Journal`]).
//! - [`store`]: RocksDB, the group-commit WAL writer, recovery. The only module naming rocksdb.
//! - [`server`]: tokio: accept loop, connections, pipelining, backpressure, shutdown.
//! - [`metrics`], [`config`]: at the side.
//! - [`client`]: the protocol client that giftctl, giftload and the tests share; [`bulk`]: bulk jobs
//!   (range or manifest, batch frames, resumable by job id) on top of it.

pub mod bulk;
pub mod card_number;
pub mod client;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod wire;
