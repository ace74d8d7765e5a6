//! Shared test helpers: the seeded problems, the independent f64 oracle and the error metric
//! of `retention::validation` (the same ones `retention selftest` uses).
#![allow(unused_imports)]

pub use retention::validation::{Gates, Problem, max_rel, normal, randn, tensor, to_vec};
