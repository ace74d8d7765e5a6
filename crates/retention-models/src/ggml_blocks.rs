//! ggml's tensor element types and their dequantization to f32: the plain floats (F32, F16,
//! BF16), the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the 256-value "K"
//! super-blocks (Q4_K, Q5_K, Q6_K: [`ggml_kquants`](crate::ggml_kquants)).
//!
//! A block holds 32 values: Q8_0 is an f16 scale `d` and 32 `i8` (`x = d·q`); Q4_0 is `d` and
//! 16 bytes of 4-bit codes (`x = d·(q − 8)`); Q4_1 is `d`, an f16 offset `m` and 16 bytes
//! (`x = d·q + m`). In the 4-bit formats byte `j` holds value `j` in its low nibble and value
//! `j + 16` in its high one. Q5_0 and Q5_1 add 4 bytes (a little-endian `u32`) of fifth bits
//! before the codes, bit `i` for value `i` (`x = d·(q − 16)`, `x = d·q + m`).

use burn::tensor::{bf16, f16};

use crate::ggml_kquants::{
    Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, SUPER_BLOCK, dequantize_q6_k, dequantize_q45_k,
};

/// Values per quantized block.
const BLOCK: usize = 32;

/// A ggml tensor element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale, 4-bit codes centred on 8.
    Q4_0,
    /// Blocks of 32: f16 scale and offset, 4-bit codes.
    Q4_1,
    /// Blocks of 32: f16 scale, 5-bit codes centred on 16.
    Q5_0,
    /// Blocks of 32: f16 scale and offset, 5-bit codes.
    Q5_1,
    /// Blocks of 32: f16 scale, 8-bit codes.
    Q8_0,
    /// ggml's `Q4_K`. Super-blocks of 256: 4-bit codes, 6-bit scales and minima per 32
    /// values.
    Q4K,
    /// ggml's `Q5_K`. Super-blocks of 256: 5-bit codes, 6-bit scales and minima per 32
    /// values.
    Q5K,
    /// ggml's `Q6_K`. Super-blocks of 256: 6-bit codes, 8-bit scales per 16 values.
    Q6K,
}

impl GgmlType {
    /// The type of ggml's id (`ggml_type`), if supported here.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// Bytes of `count` values (`None`: the count is not a whole number of blocks, or
    /// overflows).
    pub fn bytes_for(self, count: usize) -> Option<usize> {
        let blocks_of = |values: usize, block_bytes: usize| {
            (count % values == 0).then(|| (count / values).checked_mul(block_bytes))?
        };
        let per_block = |block_bytes: usize| blocks_of(BLOCK, block_bytes);
        let per_super_block = |block_bytes: usize| blocks_of(SUPER_BLOCK, block_bytes);
        match self {
            Self::F32 => count.checked_mul(4),
            Self::F16 | Self::Bf16 => count.checked_mul(2),
            Self::Q4_0 => per_block(2 + BLOCK / 2),
            Self::Q4_1 => per_block(4 + BLOCK / 2),
            Self::Q5_0 => per_block(6 + BLOCK / 2),
            Self::Q5_1 => per_block(8 + BLOCK / 2),
            Self::Q8_0 => per_block(2 + BLOCK),
            Self::Q4K => per_super_block(Q4_K_BYTES),
            Self::Q5K => per_super_block(Q5_K_BYTES),
            Self::Q6K => per_super_block(Q6_K_BYTES),
        }
    }
}

/// `count` values of type `ty` from `bytes` as f32 (`None` when `bytes` is not exactly their
/// size).
pub fn dequantize(ty: GgmlType, bytes: &[u8], count: usize) -> Option<Vec<f32>> {
    if ty.bytes_for(count)? != bytes.len() {
        return None;
    }
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    Some(match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(half).collect(),
        GgmlType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => bytes
            .chunks_exact(2 + BLOCK)
            .flat_map(|block| {
                let d = half(&block[..2]);
                block[2..].iter().map(move |&q| d * f32::from(q as i8))
            })
            .collect(),
        GgmlType::Q4_0 => code_blocks(bytes, 2, false, |block, q| {
            (f32::from(q) - 8.0) * half(&block[..2])
        }),
        GgmlType::Q4_1 => code_blocks(bytes, 4, false, |block, q| {
            f32::from(q) * half(&block[..2]) + half(&block[2..4])
        }),
        GgmlType::Q5_0 => code_blocks(bytes, 2, true, |block, q| {
            (f32::from(q) - 16.0) * half(&block[..2])
        }),
        GgmlType::Q5_1 => code_blocks(bytes, 4, true, |block, q| {
            f32::from(q) * half(&block[..2]) + half(&block[2..4])
        }),
        GgmlType::Q4K => dequantize_q45_k(bytes, false),
        GgmlType::Q5K => dequantize_q45_k(bytes, true),
        GgmlType::Q6K => dequantize_q6_k(bytes),
    })
}

/// The 4- and 5-bit formats: blocks of a `head_bytes` header, for the 5-bit ones
/// (`fifth_bits`) 4 bytes of fifth bits (a little-endian `u32`, bit `i` for value `i`), then
/// 16 bytes of codes, value `j` in the low nibble of byte `j` and value `j + 16` in its high
/// one; `value(block, q)` turns code `q` into its value with the block's header (in ggml's
/// order of operations).
fn code_blocks(
    bytes: &[u8],
    head_bytes: usize,
    fifth_bits: bool,
    value: impl Fn(&[u8], u8) -> f32,
) -> Vec<f32> {
    let high_bytes = if fifth_bits { 4 } else { 0 };
    let block_bytes = head_bytes + high_bytes + BLOCK / 2;
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * BLOCK);
    for block in bytes.chunks_exact(block_bytes) {
        let mut high = [0u8; 4];
        high[..high_bytes].copy_from_slice(&block[head_bytes..head_bytes + high_bytes]);
        let high = u32::from_le_bytes(high);
        let fifth = |i: usize| (((high >> i) & 1) as u8) << 4;
        let codes = &block[head_bytes + high_bytes..];
        for (shift, first) in [(0, 0), (4, BLOCK / 2)] {
            out.extend(
                codes
                    .iter()
                    .enumerate()
                    .map(|(j, &q)| value(block, ((q >> shift) & 0x0f) | fifth(first + j))),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_is_scale_times_code() {
        let mut block = f16_bytes(0.5).to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let x = dequantize(GgmlType::Q8_0, &block, 32).expect("one block");
        let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
        assert_eq!(x, want);
    }

    #[test]
    fn q4_blocks_put_low_nibbles_first() {
        // byte j: low nibble j % 16, high nibble 15 - j % 16
        let codes: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut q4_0 = f16_bytes(2.0).to_vec();
        q4_0.extend(&codes);
        let x = dequantize(GgmlType::Q4_0, &q4_0, 32).expect("one block");
        for j in 0..16 {
            assert_eq!(x[j], 2.0 * (j as f32 - 8.0), "low nibble {j}");
            assert_eq!(x[j + 16], 2.0 * (7.0 - j as f32), "high nibble {j}");
        }
        let mut q4_1 = f16_bytes(0.25).to_vec();
        q4_1.extend(f16_bytes(-1.0));
        q4_1.extend(&codes);
        let x = dequantize(GgmlType::Q4_1, &q4_1, 32).expect("one block");
        for j in 0..16 {
            assert_eq!(x[j], 0.25 * j as f32 - 1.0);
            assert_eq!(x[j + 16], 0.25 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn plain_floats_and_sizes() {
        let x = [1.5f32, -2.25];
        let f32_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f32_bytes, 2), Some(x.to_vec()));
        let f16s: Vec<u8> = x.iter().flat_map(|v| f16_bytes(*v)).collect();
        assert_eq!(dequantize(GgmlType::F16, &f16s, 2), Some(x.to_vec()));
        let bf16s: Vec<u8> = x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::Bf16, &bf16s, 2), Some(x.to_vec()));
        // a wrong byte count or a partial block is refused
        assert_eq!(dequantize(GgmlType::F32, &f32_bytes, 3), None);
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q8_0.bytes_for(usize::MAX - 31), None);
        assert_eq!(GgmlType::from_id(12), Some(GgmlType::Q4K));
        assert_eq!(GgmlType::from_id(10), None, "Q2_K is not read");
    }
}
