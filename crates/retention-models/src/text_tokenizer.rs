//! A byte-level BPE tokenizer (Hugging Face's `tokenizers` crate), trained on the corpus or
//! loaded from its `tokenizer.json`.

use std::path::Path;

use tokenizers::Tokenizer;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::ModelError;

/// Byte-level BPE: every byte sequence has an encoding, and merges learned from the corpus make
/// frequent words single tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn tokenizer_error(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Learns a vocabulary of `vocab_size` tokens (the 256 byte symbols included) from `text`.
    ///
    /// # Errors
    /// [`ModelError::Config`] when `vocab_size < 256`; [`ModelError::Tokenizer`] when training
    /// fails.
    pub fn train(text: &str, vocab_size: usize) -> Result<Self, ModelError> {
        if vocab_size < 256 {
            return Err(ModelError::Config(format!(
                "vocab_size must be at least 256 (one token per byte), got {vocab_size}"
            )));
        }
        let mut inner = Tokenizer::new(BPE::default());
        // no prefix space: the text is encoded line by line and must decode to itself
        let byte_level = ByteLevel::new(false, true, true);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build()
            .into();
        inner
            .train(&mut trainer, text.lines())
            .map_err(tokenizer_error)?;
        Ok(Self { inner })
    }

    /// Loads a `tokenizer.json`.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the file is missing or not a tokenizer.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Writes `tokenizer.json`.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when writing fails.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token ids of `text`.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when encoding fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        // line by line: the byte-level pre-tokenizer's regex is slow on one multi-megabyte input
        let mut ids = Vec::with_capacity(text.len() / 3);
        for line in text.split_inclusive('\n') {
            let encoding = self
                .inner
                .encode_fast(line, false)
                .map_err(tokenizer_error)?;
            ids.extend_from_slice(encoding.get_ids());
        }
        Ok(ids)
    }

    /// The text of `ids`.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when an id is outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, false).map_err(tokenizer_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_it_has_and_has_not_seen() {
        let text = "In the beginning God created the heaven and the earth.\n".repeat(20);
        let tok = TextTokenizer::train(&text, 300).unwrap();
        assert!(tok.vocab_size() > 256 && tok.vocab_size() <= 300);
        for sample in ["the heaven and the earth.\n", "Zebras ünd ß 42\n"] {
            let ids = tok.encode(sample).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), sample);
        }
        // merges make the seen text shorter than its bytes
        assert!(tok.encode(&text).unwrap().len() < text.len() / 2);
    }

    #[test]
    fn too_small_a_vocabulary_is_refused() {
        assert!(matches!(
            TextTokenizer::train("abc", 100),
            Err(ModelError::Config(_))
        ));
    }
}
