//! chatpool: a chat backend for one machine, served by a fixed pool of OS threads.
//!
//! A request flows one way: tiny_http → the acceptor thread ([`server`]), which names its tenant
//! ([`auth`]) and admits it ([`admission`]) into the job queue ([`handoff`]) → a worker thread ([`pool`])
//! running the API handler ([`api`]) → SQLite ([`store`]) and the LLM ([`llm`]) → the response. [`tenants`] keeps
//! each tenant's limits and what it has used of them. [`config`] holds the
//! settings, [`metrics`] what the pool is doing, and [`mock_llm`] a fake LLM server for tests
//! and load.

pub mod acceptor;
pub mod admission;
pub mod api;
pub mod auth;
pub mod config;
pub mod handoff;
pub mod listen;
pub mod llm;
pub mod metrics;
pub mod mock_llm;
pub mod pool;
pub mod readiness;
pub mod server;
pub mod store;
pub mod tenants;
pub mod validate;
