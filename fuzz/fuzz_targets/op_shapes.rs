//! The op's shape and option validation on arbitrary shapes, degrees, chunks, scales and
//! state shapes: an error or a valid problem, never a panic, an overflow or a hang.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use retention::{RetentionOptions, check_shapes, check_state_shapes};

#[derive(Debug, Arbitrary)]
struct Input {
    q: Vec<usize>,
    k: Vec<usize>,
    v: Vec<usize>,
    log_g: Option<Vec<usize>>,
    degree: usize,
    chunk: Option<usize>,
    scale: Option<f64>,
    state: Vec<usize>,
    key_sum: Vec<usize>,
}

fuzz_target!(|input: Input| {
    let options = RetentionOptions::new()
        .with_degree(input.degree)
        .with_chunk_size(input.chunk)
        .with_scale(input.scale);
    if let Ok(dims) = check_shapes(
        &input.q,
        &input.k,
        &input.v,
        input.log_g.as_deref(),
        &options,
    ) {
        let _ = check_state_shapes(&dims, input.degree, &input.state, &input.key_sum);
    }
});
