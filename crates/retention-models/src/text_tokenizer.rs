//! A byte-level BPE tokenizer (Hugging Face's `tokenizers` crate), trained on the corpus or
//! loaded from its `tokenizer.json`.

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::{GgufFile, GgufValue, ModelError};

/// `token_type` of a control token in GGUF's tokenizer metadata (llama.cpp's
/// `LLAMA_TOKEN_TYPE_CONTROL`).
const CONTROL_TOKEN: u64 = 3;

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

    /// The tokenizer a GGUF checkpoint describes (`tokenizer.ggml.*`): its byte-level BPE
    /// vocabulary and merges (`tokenizer.ggml.model = gpt2`, as SmolLM2's and Llama 3's), with
    /// the control tokens (`token_type` 3: `<|im_start|>`, …) as special tokens that the text
    /// never splits. No token is added around the text (the checkpoint's chat template does
    /// that).
    ///
    /// # Errors
    /// [`ModelError::Gguf`] when a key is missing or of the wrong type, or the tokenizer model
    /// is not `gpt2`; [`ModelError::Tokenizer`] when the vocabulary and merges do not make a BPE.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            file.value(key)?
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .ok_or_else(|| ModelError::Gguf(format!("{key}: not an array of strings")))
        };
        let model = file
            .value("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(ModelError::Gguf(format!(
                "tokenizer.ggml.model is {model:?}; only byte-level BPE (gpt2) is read"
            )));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Gguf(format!("merge {m:?}: not two symbols")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let kinds: Vec<u64> = match file.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .and_then(|items| items.iter().map(GgufValue::as_u64).collect())
                .ok_or_else(|| {
                    ModelError::Gguf("tokenizer.ggml.token_type: not integers".into())
                })?,
            None => Vec::new(),
        };
        let vocab: Vocab = tokens.iter().cloned().zip(0u32..).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tokenizer_error)?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, false, true);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&kinds)
            .filter(|(_, kind)| **kind == CONTROL_TOKEN)
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        inner.add_special_tokens(&special);
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
    use crate::gguf_file::test_files::{gguf_bytes, gguf_string, gguf_strings};

    /// A GGUF tokenizer: byte-level symbols, two merges, one control token.
    fn tiny_gguf(model: &str) -> GgufFile {
        let tokens = ["<|s|>", "a", "b", "ab", "Ġ", "Ġab"];
        let mut kinds = 4u32.to_le_bytes().to_vec(); // an array of u32
        kinds.extend((tokens.len() as u64).to_le_bytes());
        for kind in [3u32, 1, 1, 1, 1, 1] {
            kinds.extend(kind.to_le_bytes());
        }
        let bytes = gguf_bytes(
            &[
                ("tokenizer.ggml.model", 8, gguf_string(model)),
                ("tokenizer.ggml.tokens", 9, gguf_strings(&tokens)),
                ("tokenizer.ggml.merges", 9, gguf_strings(&["a b", "Ġ ab"])),
                ("tokenizer.ggml.token_type", 9, kinds),
            ],
            &[],
        );
        GgufFile::parse(bytes).expect("a valid file")
    }

    #[test]
    fn gguf_vocabulary_merges_and_control_tokens() {
        let tok = TextTokenizer::from_gguf(&tiny_gguf("gpt2")).expect("builds");
        assert_eq!(tok.vocab_size(), 6);
        assert_eq!(tok.encode("ab ab").expect("encodes"), [3, 5]);
        // the control token is never split, and is kept as itself in the text
        assert_eq!(tok.encode("<|s|>ab").expect("encodes"), [0, 3]);
        assert_eq!(tok.decode(&[3, 5]).expect("decodes"), "ab ab");
        assert!(matches!(
            TextTokenizer::from_gguf(&tiny_gguf("llama")),
            Err(ModelError::Gguf(m)) if m.contains("llama")
        ));
    }

    /// SmolLM2-135M-Instruct's tokenizer where `RETENTION_SMOLLM2_GGUF` names the checkpoint:
    /// ids as Hugging Face `transformers` 4.57 builds the tokenizer from the same file
    /// (`integrations.ggml.convert_gguf_tokenizer`).
    #[test]
    fn smollm2_tokenizer_matches_transformers() {
        let Ok(path) = std::env::var("RETENTION_SMOLLM2_GGUF") else {
            eprintln!("skipped: set RETENTION_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf");
            return;
        };
        let tok = TextTokenizer::from_gguf(&GgufFile::read(&path).expect("reads")).expect("builds");
        assert_eq!(tok.vocab_size(), 49152);
        for (text, ids) in [
            (
                "Hello, world! 12345 tokens.",
                vec![19556, 28, 905, 17, 216, 33, 34, 35, 36, 37, 17837, 30],
            ),
            (
                "In the beginning God created the heaven and the earth.",
                vec![788, 260, 3616, 1839, 2312, 260, 10419, 284, 260, 3103, 30],
            ),
            (
                "  spaces\tand\nnewlines ünïcödé 😀",
                vec![
                    216, 5600, 197, 397, 198, 2241, 5110, 5549, 137, 94, 25972, 83, 7466, 84, 2756,
                    40303, 218,
                ],
            ),
            (
                "<|im_start|>user\nHi<|im_end|>",
                vec![1, 4093, 198, 26843, 2],
            ),
        ] {
            assert_eq!(tok.encode(text).expect("encodes"), ids, "{text:?}");
            assert_eq!(tok.decode(&ids).expect("decodes"), text);
        }
    }

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
