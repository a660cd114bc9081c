//! End-to-end tests: one binary, one module per area.

mod documents;
mod hub;
mod instrument;
mod pipeline;
mod trainer;
