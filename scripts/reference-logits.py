#!/usr/bin/env python3
"""Reference logits of a GGUF checkpoint through Hugging Face `transformers`.

    python3 scripts/reference-logits.py models/SmolLM2-135M-Instruct.Q4_1.gguf OUT.json

Needs torch, transformers 4.57, accelerate and gguf (CPU is enough). transformers dequantizes
the GGUF itself and runs its own Llama in f32; we record, for two fixed prompts and every
position, the top 10 logits, the logits at 32 fixed token ids and the row's logsumexp (which
depends on every logit of the vocabulary). `llama_model.rs`'s `smollm2_logits_match_transformers`
compares `LlamaModel`'s logits with this file.
"""
import json
import os
import random
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep.",
]


def main(path, out):
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    fixed = sorted(random.Random(7).sample(range(vocab), 32))
    prompts = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        rows = []
        for row in logits:
            top = row.topk(10)
            rows.append({
                "top_ids": top.indices.tolist(),
                "top_logits": [round(v, 5) for v in top.values.tolist()],
                "fixed_logits": [round(row[i].item(), 5) for i in fixed],
                "logsumexp": round(torch.logsumexp(row, 0).item(), 5),
            })
        prompts.append({"text": text, "ids": ids, "positions": rows})
    with open(out, "w") as f:
        json.dump({
            "checkpoint": name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "fixed_ids": fixed,
            "prompts": prompts,
        }, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
