//! The `retention` command-line tool, as a library so its commands can be tested.
#![warn(missing_docs)]

pub mod apply;
pub mod backend_choice;
pub mod bench;
pub mod bench_plot;
pub mod chart_png;
pub mod context_bench;
pub mod convert;
pub mod demo;
pub mod drift;
pub mod drift_plot;
pub mod dtype_choice;
pub mod error;
pub mod gate_pattern;
pub mod generate;
pub mod generate_latency;
pub mod kernels_choice;
pub mod numerics;
pub mod plot_losses;
pub mod retrain;
pub mod selftest;
pub mod tensor_file;
pub mod train;

pub use backend_choice::BackendChoice;
pub use dtype_choice::DtypeChoice;
pub use error::CliError;
pub use kernels_choice::KernelsChoice;
