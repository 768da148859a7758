//! minigpt: a TensorFlow-native Rust port of a notebook that trains a character-level GPT-style
//! model on Tiny Shakespeare and samples from it. Rust builds the graph through the TensorFlow C
//! API, computes gradients in the graph, applies Adam, feeds batches, and samples with
//! TensorFlow's `Multinomial` op.
//!
//! Modules, each using only those on the lines below its own:
//!
//! ```text
//! cli
//! serve, train
//! sample, eval, info
//! saved_model
//! object_graph
//! run, plot
//! graph
//! summary, sampler, loss, optim, model, cluster
//! data, device
//! proto, tfx, files, text, listen, output, memory, precision
//! library
//! ```

pub mod cli;
pub mod cluster;
pub mod data;
pub mod device;
pub mod eval;
pub mod files;
pub mod graph;
pub mod info;
pub mod library;
pub mod listen;
pub mod loss;
pub mod memory;
pub mod model;
pub mod object_graph;
pub mod optim;
pub mod output;
pub mod plot;
pub mod precision;
pub mod proto;
pub mod run;
pub mod sample;
pub mod sampler;
pub mod saved_model;
pub mod serve;
pub mod summary;
pub mod text;
pub mod tfx;
pub mod train;
