//! `retention apply`'s reading of its input file on arbitrary bytes (safetensors header,
//! dtypes, shapes, the tensors' checks against each other): an error or valid inputs, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use retention::RetentionOptions;
use retention_cli::apply::ApplyInputs;
use retention_cli::tensor_file::TensorFile;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(file) = TensorFile::from_bytes("fuzz.safetensors", bytes.to_vec()) {
        let _ = ApplyInputs::read(&file, &RetentionOptions::new().with_chunk_size(Some(16)));
    }
});
