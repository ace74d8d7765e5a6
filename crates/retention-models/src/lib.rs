//! # retention-models
//!
//! Models built on [power retention](retention): a decoder language model whose sequence mixer
//! is one config value ([`MixerKind`]), the data pipeline that trains it on a real corpus
//! ([`Corpus`], [`TextTokenizer`], [`TokenWindows`]), and a training loop with checkpoints that
//! resume exactly ([`Trainer`]).
#![warn(missing_docs)]

mod causal_lm;
mod corpus;
mod decoder_block;
mod distillation;
mod error;
mod feed_forward;
mod ggml_blocks;
mod ggml_kquants;
mod gguf_file;
mod hf_checkpoint;
mod language_model;
mod llama_cache;
mod llama_checkpoint;
mod llama_model;
mod loss_plot;
mod mixer_transfer;
mod pretrained;
mod replica_transfer;
mod retraining;
mod text_tokenizer;
mod token_sampler;
mod token_windows;
mod trainer;
mod training_run;

pub use causal_lm::{CausalLm, Trainable};
pub use corpus::Corpus;
pub use decoder_block::DecoderBlock;
pub use distillation::{distillation_loss, teacher_distribution};
pub use error::ModelError;
pub use feed_forward::{FeedForward, FeedForwardConfig};
pub use ggml_blocks::{GgmlType, dequantize};
pub use gguf_file::{GgufFile, GgufTensorInfo, GgufValue};
pub use hf_checkpoint::load_hf_llama;
pub use language_model::{LanguageModel, LanguageModelConfig, MixerKind};
pub use llama_cache::LlamaCache;
pub use llama_checkpoint::{
    GenerationInfo, Loaded, load_llama_checkpoint, save_llama_checkpoint, save_llama_description,
};
pub use llama_model::{LlamaBlock, LlamaConfig, LlamaModel, PREFILL_PIECE};
pub use loss_plot::plot_losses;
pub use mixer_transfer::{MixerTrace, mixer_transfer_loss};
pub use pretrained::Pretrained;
pub use retraining::{RecoveryStart, Retrained, retrain_in_directory};
pub use text_tokenizer::TextTokenizer;
pub use token_sampler::{SamplingConfig, TokenSampler};
pub use token_windows::{TokenBatch, TokenWindows};
pub use trainer::{LossLog, StepReport, Trainer, TrainingConfig};
pub use training_run::{
    RunDirectory, TrainingData, read_losses_csv, train_in_directory, write_losses_csv,
};
