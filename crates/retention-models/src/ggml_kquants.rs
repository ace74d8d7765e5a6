//! ggml's "K" quantizations: super-blocks of 256 values in 8 or 16 sub-blocks, each with its
//! own quantized scale (the formats of the common `Q4_K_M`, `Q5_K_M` and `Q6_K` GGUF files).
//!
//! - `Q4_K` (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of eight 6-bit sub-block scales and
//!   eight 6-bit minima, 128 bytes of 4-bit codes; `x = d·scale·q − dmin·min`.
//! - `Q5_K` (176 bytes): as `Q4_K`, plus 32 bytes holding each code's fifth bit.
//! - `Q6_K` (210 bytes): 128 bytes of the codes' low 4 bits, 64 of their high 2 bits, sixteen
//!   `i8` sub-block scales, then f16 `d`; `x = d·scale·(q − 32)`.
//!
//! Codes come in groups of 64 (Q4_K, Q5_K) or 128 (Q6_K) values: byte `l` of a group's codes
//! holds value `l` in its low nibble and value `l + 32` in its high one.

use burn::tensor::f16;

/// Values per super-block.
pub(crate) const SUPER_BLOCK: usize = 256;
/// Bytes of one `Q4_K` super-block.
pub(crate) const Q4_K_BYTES: usize = 4 + 12 + SUPER_BLOCK / 2;
/// Bytes of one `Q5_K` super-block.
pub(crate) const Q5_K_BYTES: usize = 4 + 12 + SUPER_BLOCK / 8 + SUPER_BLOCK / 2;
/// Bytes of one `Q6_K` super-block.
pub(crate) const Q6_K_BYTES: usize = SUPER_BLOCK / 2 + SUPER_BLOCK / 4 + SUPER_BLOCK / 16 + 2;

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Sub-block `j`'s 6-bit scale and minimum from the 12 packed bytes: the first four
/// sub-blocks keep theirs in the low 6 bits of bytes `j` and `j + 4`; the last four keep their
/// low 4 bits in the nibbles of byte `j + 4` and their top 2 bits in the top bits of bytes
/// `j − 4` and `j`.
fn scale_and_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// `Q4_K` (`fifth_bits: false`) or `Q5_K` super-blocks to f32.
pub(crate) fn dequantize_q45_k(bytes: &[u8], fifth_bits: bool) -> Vec<f32> {
    let block_bytes = if fifth_bits { Q5_K_BYTES } else { Q4_K_BYTES };
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * SUPER_BLOCK);
    for block in bytes.chunks_exact(block_bytes) {
        let (d, dmin) = (half(&block[0..2]), half(&block[2..4]));
        let packed = &block[4..16];
        let (high, codes) = if fifth_bits {
            (&block[16..48], &block[48..])
        } else {
            (&block[16..16], &block[16..])
        };
        for group in 0..4 {
            let codes = &codes[32 * group..32 * group + 32];
            for (half_index, shift) in [(0, 0), (1, 4)] {
                let (scale, min) = scale_and_min(packed, 2 * group + half_index);
                let (d1, m1) = (d * f32::from(scale), dmin * f32::from(min));
                let bit = 1u8 << (2 * group + half_index);
                out.extend(codes.iter().enumerate().map(|(l, &c)| {
                    let mut q = (c >> shift) & 0x0f;
                    if fifth_bits && high[l] & bit != 0 {
                        q += 16;
                    }
                    d1 * f32::from(q) - m1
                }));
            }
        }
    }
    out
}

/// `Q6_K` super-blocks to f32.
pub(crate) fn dequantize_q6_k(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / Q6_K_BYTES * SUPER_BLOCK);
    for block in bytes.chunks_exact(Q6_K_BYTES) {
        let d = half(&block[208..210]);
        for group in 0..2 {
            let low = &block[64 * group..64 * group + 64];
            let high = &block[128 + 32 * group..128 + 32 * group + 32];
            let scales = &block[192 + 8 * group..192 + 8 * group + 8];
            // quarter k of the group's 128 values: the low nibbles (k < 2) or high nibbles of
            // bytes 0..32 (k even) or 32..64 (k odd), the top two bits at bit 2k of the high
            // bytes
            let start = out.len();
            out.resize(start + 128, 0.0);
            for k in 0..4 {
                let (offset, shift) = (32 * (k % 2), 4 * (k / 2));
                for l in 0..32 {
                    let q = ((low[offset + l] >> shift) & 0x0f) | (((high[l] >> (2 * k)) & 3) << 4);
                    let scale = f32::from(scales[l / 16 + 2 * k] as i8);
                    out[start + 32 * k + l] = d * scale * (f32::from(q) - 32.0);
                }
            }
        }
    }
    out
}
