//! The Tether coordinator (`tether serve`) and its command-line interface.
//!
//! [`engine`] owns workspace state and every status change; [`tunnel`] speaks the agent protocol over
//! QUIC; [`api`] is the HTTP JSON API; [`store`] is the only module with SQL; [`provision`] starts and
//! stops workspaces' compute; [`status`] holds the pure rules for status and liveness.

pub mod api;
pub mod cli;
pub mod client;
pub mod demo;
pub mod engine;
pub mod pki;
pub mod provision;
pub mod server;
pub mod status;
pub mod store;
pub mod template;
pub mod tunnel;
pub mod view;
