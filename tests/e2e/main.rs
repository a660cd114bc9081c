//! End-to-end tests: one binary, one module per area.

mod hub;

mod trainer;

mod pipeline;

mod instrument;
