//! Helpers shared by the end-to-end tests: paths to the shipped fixtures, the loopback hub server
//! and the mutator of the hostile-bytes tests.

pub mod fixtures;
pub mod hub;
pub mod mutate;
