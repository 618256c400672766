//! chatpool's over-the-wire tests: real servers on ephemeral loopback ports, real processes,
//! temp databases. One test binary; each module covers one part of the contract.

mod support;

mod admission;
mod api;
mod auth;
mod cancellation;
mod edge;
mod hostile;
mod lifecycle;
mod metrics;
mod openai;
mod resilience;
mod responses;
mod streaming;
mod tenants;
mod transfer;
mod upstream;
