//! The block types beyond SmolLM2's own against ggml's Python library: random blocks
//! dequantized by `gguf` (`scripts/ggml-block-vectors.py` wrote the values).

use retention_models::{GgmlType, dequantize};

#[derive(serde::Deserialize)]
struct Vectors {
    hex: String,
    values: Vec<f32>,
}

fn bytes_of(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn block_types_match_ggml() {
    let text = include_str!("data/ggml-block-vectors.json");
    let all: std::collections::BTreeMap<String, Vectors> =
        serde_json::from_str(text).expect("vectors");
    let types = [
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q4_K", GgmlType::Q4K),
        ("Q5_K", GgmlType::Q5K),
        ("Q6_K", GgmlType::Q6K),
    ];
    assert_eq!(all.len(), types.len());
    for (name, ty) in types {
        let v = &all[name];
        let bytes = bytes_of(&v.hex);
        assert_eq!(
            ty.bytes_for(v.values.len()),
            Some(bytes.len()),
            "{name} size"
        );
        let got = dequantize(ty, &bytes, v.values.len()).expect("dequantizes");
        let scale = v.values.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: all-zero vectors check nothing");
        let worst = got
            .iter()
            .zip(&v.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-6 * scale,
            "{name}: worst difference {worst:e} (largest value {scale:e})"
        );
        // one value short of a whole (super-)block is refused
        assert_eq!(dequantize(ty, &bytes, v.values.len() - 1), None);
    }
}
