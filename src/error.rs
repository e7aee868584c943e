//! The library's error type: every variant says what went wrong, where, and what fixes it.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{model}: {file} not found (looked in {looked}).\n  fix: {fix}")]
    MissingModelFile {
        model: String,
        file: String,
        looked: String,
        fix: String,
    },

    #[error("{model}: {file} does not match what dnd expects: {detail}.\n  fix: {fix}")]
    ModelMismatch {
        model: String,
        file: String,
        detail: String,
        fix: String,
    },

    #[error("{model}: download of {file} failed: {reason}.\n  fix: check the network and the repo id, or point {flag} at a local folder")]
    Download {
        model: String,
        file: String,
        flag: String,
        reason: String,
    },

    #[error("setting {key}: {reason}")]
    Setting { key: String, reason: String },

    #[error("{path}: {reason}")]
    Probe { path: PathBuf, reason: String },

    #[error("layer {layer:?} does not exist in {target}. Valid layers: {valid}")]
    UnknownLayer {
        layer: String,
        target: String,
        valid: String,
    },

    #[error("neuron {neuron} is out of range for layer {layer}: it has {count} neurons (valid: 0..={})", count.saturating_sub(1))]
    NeuronOutOfRange {
        layer: String,
        neuron: usize,
        count: usize,
    },

    #[error("device {spec}: {reason}")]
    Device { spec: String, reason: String },

    // The I/O error is part of the message, not a source: chained, it was printed twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("activation cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },

    #[error("{model}: {detail}")]
    Model { model: String, detail: String },

    #[error(transparent)]
    Llm(#[from] crate::summarise::LlmError),

    #[error("results store {path}: {reason}")]
    Store { path: PathBuf, reason: String },

    #[error("cancelled")]
    Cancelled,

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}
