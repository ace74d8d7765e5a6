//! The training text: a public-domain English corpus taken from a package registry, or any text
//! file.
//!
//! The default is the King James Version of the Bible (4.3 MB of public-domain English), which
//! Debian ships in the `bible-kjv` package: `apt-get install -y bible-kjv` installs the `bible`
//! program, and [`Corpus::kjv`] reads the whole text through it. Nothing is committed or
//! generated.

use std::path::Path;
use std::process::Command;

use crate::ModelError;

/// The verse range that spans the whole KJV text, as the `bible` program reads it.
const KJV_RANGE: &str = "Gen1:1-Rev22:21";

/// A text corpus split into a training part and a held-out validation tail.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Where the text came from (shown in logs and reports).
    pub source: String,
    /// The text.
    pub text: String,
}

impl Corpus {
    /// Reads a UTF-8 text file.
    ///
    /// # Errors
    /// [`ModelError::Io`] when the file cannot be read, [`ModelError::Corpus`] when it is empty.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::new(path.display().to_string(), text)
    }

    /// The King James Version through Debian's `bible` program (package `bible-kjv`).
    ///
    /// # Errors
    /// [`ModelError::Corpus`] when the program is missing (the message says how to install it)
    /// or prints nothing.
    pub fn kjv() -> Result<Self, ModelError> {
        let output = Command::new("bible").arg(KJV_RANGE).output().map_err(|e| {
            ModelError::Corpus(format!(
                "the KJV corpus needs Debian's `bible` program ({e}); install it with \
                 `apt-get install -y bible-kjv`, or pass a text file"
            ))
        })?;
        if !output.status.success() {
            return Err(ModelError::Corpus(format!(
                "`bible {KJV_RANGE}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let text = String::from_utf8(output.stdout)
            .map_err(|e| ModelError::Corpus(format!("`bible` printed invalid UTF-8: {e}")))?;
        Self::new("King James Version (Debian bible-kjv)".into(), text)
    }

    /// `kjv` for the KJV, anything else a text file's path.
    ///
    /// # Errors
    /// Those of [`Corpus::kjv`] and [`Corpus::from_file`].
    pub fn open(name: &str) -> Result<Self, ModelError> {
        if name == "kjv" {
            Self::kjv()
        } else {
            Self::from_file(name)
        }
    }

    fn new(source: String, text: String) -> Result<Self, ModelError> {
        if text.trim().is_empty() {
            return Err(ModelError::Corpus(format!("{source} holds no text")));
        }
        Ok(Self { source, text })
    }

    /// The first `max_bytes` bytes (cut back to a character boundary), for quick runs.
    pub fn truncated(mut self, max_bytes: usize) -> Self {
        if self.text.len() > max_bytes {
            let mut end = max_bytes;
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
            self.text.truncate(end);
            self.source = format!("{} (first {} bytes)", self.source, end);
        }
        self
    }

    /// `(training text, validation text)`: the last `valid_fraction` of the text (cut at a line
    /// break) is held out.
    pub fn split(&self, valid_fraction: f64) -> (&str, &str) {
        let len = self.text.len();
        let mut at = len - ((len as f64) * valid_fraction.clamp(0.0, 0.5)) as usize;
        while !self.text.is_char_boundary(at) {
            at -= 1;
        }
        let at = self.text[..at].rfind('\n').map_or(at, |i| i + 1);
        self.text.split_at(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_the_tail_at_a_line_break() {
        let corpus = Corpus::new("t".into(), "one\ntwo\nthree\nfour\n".into()).unwrap();
        let (train, valid) = corpus.split(0.3);
        assert_eq!(format!("{train}{valid}"), corpus.text);
        assert!(train.ends_with('\n'));
        assert_eq!(valid, "four\n");
    }

    #[test]
    fn empty_text_is_refused() {
        assert!(matches!(
            Corpus::new("t".into(), " \n".into()),
            Err(ModelError::Corpus(_))
        ));
    }
}
