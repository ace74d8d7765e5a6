//! Reading and writing named tensors in safetensors files (f32, f16, bf16).

use std::collections::HashMap;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::CliError;

/// Element type of a tensor in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

/// A tensor read from a file, widened to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Row-major values.
    pub values: Vec<f32>,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type it had in the file.
    pub dtype: FileDtype,
}

/// The tensors of one safetensors file, by name.
pub struct TensorFile {
    path: String,
    bytes: Vec<u8>,
}

impl TensorFile {
    /// Reads the whole file.
    ///
    /// # Errors
    /// [`CliError::Io`] or, for a bad header, [`CliError::Format`].
    pub fn open(path: &str) -> Result<Self, CliError> {
        let bytes = std::fs::read(path).map_err(|source| CliError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(path, bytes)
    }

    /// A file's bytes, already read (`path` names it in errors).
    ///
    /// # Errors
    /// [`CliError::Format`] for a bad header.
    pub fn from_bytes(path: &str, bytes: Vec<u8>) -> Result<Self, CliError> {
        let file = Self {
            path: path.into(),
            bytes,
        };
        file.parse()?;
        Ok(file)
    }

    fn parse(&self) -> Result<SafeTensors<'_>, CliError> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| CliError::Format {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// Reads tensor `name`, or `None` when the file has no such tensor.
    ///
    /// # Errors
    /// [`CliError::Dtype`] for element types other than F32, F16 and BF16.
    pub fn get(&self, name: &str) -> Result<Option<HostTensor>, CliError> {
        let st = self.parse()?;
        let Ok(view) = st.tensor(name) else {
            return Ok(None);
        };
        let data = view.data();
        let (values, dtype) = match view.dtype() {
            Dtype::F32 => (
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                FileDtype::F32,
            ),
            Dtype::F16 => (
                data.chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                FileDtype::F16,
            ),
            Dtype::BF16 => (
                data.chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                FileDtype::BF16,
            ),
            other => {
                return Err(CliError::Dtype {
                    path: self.path.clone(),
                    name: name.into(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(Some(HostTensor {
            values,
            shape: view.shape().to_vec(),
            dtype,
        }))
    }

    /// Reads tensor `name`, which must exist.
    ///
    /// # Errors
    /// [`CliError::MissingTensor`], or the errors of [`get`](Self::get).
    pub fn require(&self, name: &str) -> Result<HostTensor, CliError> {
        self.get(name)?.ok_or_else(|| {
            let mut found: Vec<String> = self
                .parse()
                .map(|st| st.names().into_iter().map(String::from).collect())
                .unwrap_or_default();
            found.sort();
            CliError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
                found: if found.is_empty() {
                    "none".into()
                } else {
                    found.join(", ")
                },
            }
        })
    }
}

fn encode(values: &[f32], dtype: FileDtype) -> (Dtype, Vec<u8>) {
    match dtype {
        FileDtype::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        FileDtype::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        FileDtype::BF16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
    }
}

/// Writes named tensors to a safetensors file.
///
/// # Errors
/// [`CliError::Io`] or [`CliError::Format`].
pub fn write(path: &str, tensors: &[(&str, &HostTensor)]) -> Result<(), CliError> {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dt, bytes) = encode(&t.values, t.dtype);
            (name.to_string(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let format_err = |e: safetensors::SafeTensorError| CliError::Format {
        path: path.into(),
        message: e.to_string(),
    };
    let views = encoded
        .iter()
        .map(|(name, dt, shape, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(*dt, shape.clone(), bytes).map_err(format_err)?,
            ))
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    let bytes = safetensors::serialize(views, Option::<HashMap<String, String>>::None)
        .map_err(format_err)?;
    std::fs::write(path, bytes).map_err(|source| CliError::Io {
        path: path.into(),
        source,
    })
}
