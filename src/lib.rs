//! Describe-and-Dissect: explains what hidden neurons of vision networks detect.
//!
//! The library is the pipeline core; the `dnd` binary is one consumer of it. Nothing here
//! touches the terminal.

pub mod activations;
pub mod bench;
pub mod caption;
pub mod clip;
pub mod config;
mod cpu_ops;
pub mod crops;
pub mod device;
pub mod engine;
pub mod error;
mod gpu_ops;
pub mod hub;
pub(crate) mod nn;
pub mod pipeline;
pub mod probe;
pub mod score;
pub mod store;
pub mod summarise;
pub mod synthesise;
pub mod target;
pub mod tui;
pub mod workspace;

pub use error::{Error, Result};
