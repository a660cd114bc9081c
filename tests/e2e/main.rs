//! End-to-end tests: one binary, one module per area.

mod demo;
mod documents;
mod fuzz;
mod hub;
mod instrument;
mod kill;
mod pipeline;
mod trainer;
