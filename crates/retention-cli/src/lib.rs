//! The `retention` command-line tool, as a library so its commands can be tested.
#![warn(missing_docs)]

pub mod apply;
pub mod backend_choice;
pub mod demo;
pub mod error;
pub mod tensor_file;

pub use backend_choice::BackendChoice;
pub use error::CliError;
