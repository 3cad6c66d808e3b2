//! The Tether coordinator (`tether serve`) and its command-line interface.
//!
//! [`engine`] owns workspace state and every status change; [`tunnel`] speaks the agent protocol over
//! QUIC; [`api`] is the HTTP JSON API; [`store`] is the only module with SQL; [`provision`] starts and
//! stops workspaces' compute; [`status`] holds the pure rules for status and liveness.

pub mod api;
pub mod api_ssh;
pub mod backup;
pub mod broker;
pub mod cli;
pub mod cli_ssh;
pub mod client;
pub mod config;
pub use tether_shared::datalock;
pub mod demo;
pub mod dist;
pub mod engine;
pub mod frontdoor;
pub mod https;
pub mod metrics;
pub mod pki;
pub mod places;
pub mod provision;
pub mod ratelimit;
pub mod retention;
pub mod server;
pub mod sshca;
pub mod status;
pub mod store;
pub mod template;
pub mod tunnel;
pub mod users;
pub mod view;
