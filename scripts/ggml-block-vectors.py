#!/usr/bin/env python3
"""Reference values for the GGUF block types `ggml_blocks.rs` dequantizes: random blocks
(their f16 scales set to finite values) dequantized by the `gguf` package (ggml's own Python
library), written to crates/retention-models/tests/data/ggml-block-vectors.json.

    pip install gguf numpy && python3 scripts/ggml-block-vectors.py
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES
from gguf.quants import dequantize

rng = np.random.default_rng(20261129)
# where each block type keeps its f16 scale (and offset/minimum) fields
HALF_FIELDS = {
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
out = {}
for name, offsets in HALF_FIELDS.items():
    ty = T[name]
    block_size, type_size = GGML_QUANT_SIZES[ty]
    blocks = 2
    raw = rng.integers(0, 256, size=blocks * type_size, dtype=np.uint8)
    for b in range(blocks):
        for off in offsets:
            half = np.array([rng.uniform(-0.05, 0.05)], dtype=np.float16).view(np.uint8)
            raw[b * type_size + off : b * type_size + off + 2] = half
    values = dequantize(raw, ty).astype(np.float32).reshape(-1)
    assert values.size == blocks * block_size and np.isfinite(values).all()
    out[name] = {"hex": raw.tobytes().hex(), "values": [float(v) for v in values]}

path = pathlib.Path(__file__).resolve().parent.parent / "crates/retention-models/tests/data/ggml-block-vectors.json"
path.write_text(json.dumps(out))
print(path, {k: len(v["values"]) for k, v in out.items()})
