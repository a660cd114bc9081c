//! Helpers shared by the end-to-end tests: paths to the shipped fixtures and the loopback hub server.

pub mod fixtures;
pub mod hub;
