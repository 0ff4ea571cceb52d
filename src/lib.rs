//! qsguard: a reverse proxy for Qlik Sense that passes the session cookie through byte for
//! byte and keeps every user under Qlik's parallel-session limit. See ARCHITECTURE.md for the
//! map of the code.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod diagnostics;
pub mod head_view;
pub mod logging;
pub mod ntlm;
pub mod ops;
pub mod pages;
pub mod proxy;
pub mod qps;
pub mod server;
pub mod session;
pub mod sim;
pub mod tls_client;

pub use config::Config;
pub use server::Guard;
