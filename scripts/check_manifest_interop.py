"""Checks `retention apply` against Manifest AI's `retention` library (the PyTorch/Triton
implementation) on the same inputs: same semantics means the same outputs up to bf16 rounding.

Run where torch, triton, safetensors and the `retention` wheel are importable (a GPU):
  python3 scripts/check_manifest_interop.py --binary target/release/retention [--backend cuda]
Prints one line per case: relative Frobenius error of ours vs Manifest's, and of each vs an
f64 attention-form reference computed here. Exits non-zero if ours vs Manifest exceeds 1e-2
(the bf16 tolerance Manifest's own tests use).
"""
import argparse, os, subprocess, sys, tempfile
import torch
from safetensors.torch import load_file, save_file
from retention import power_retention

ap = argparse.ArgumentParser()
ap.add_argument("--binary", required=True)
ap.add_argument("--backend", default="cuda")
args = ap.parse_args()


def naive(q, k, v, log_g, p=2):
    """f64 attention form: y_i = sum_j w_ij v_j / sum_j w_ij, w = (q.k/sqrt d)^p e^{G_i-G_j}."""
    q, k, v = q.double(), k.double(), v.double()
    b, t, hq, d = q.shape
    h = k.shape[2]
    r = hq // h
    k = k.repeat_interleave(r, dim=2)
    v = v.repeat_interleave(r, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / d**0.5
    w = s.pow(p)
    if log_g is not None:
        g = log_g.double().cumsum(1).repeat_interleave(r, dim=2).transpose(1, 2)  # b h t
        w = w * torch.exp(g[..., :, None] - g[..., None, :]).tril()
    w = w.tril()
    return (torch.einsum("bhij,bjhe->bihe", w, v) / w.sum(-1).transpose(1, 2)[..., None])


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


cases = [  # name, b, t, hq, h, d, chunk, gated
    ("attention form, GQA 5, d=128", 1, 512, 10, 2, 128, None, True),
    ("chunked c=128, t=1000", 2, 1000, 4, 2, 64, 128, True),
    ("chunked c=64, no gates", 1, 700, 8, 8, 64, 64, False),
]
torch.manual_seed(0)
worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    for name, b, t, hq, h, d, chunk, gated in cases:
        q = torch.randn(b, t, hq, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, t, h, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(b, t, h, d, dtype=torch.bfloat16, device="cuda")
        log_g = torch.nn.functional.logsigmoid(4 + torch.randn(b, t, h, device="cuda")) if gated else None
        theirs = power_retention(q, k, v, log_g, deg=2, chunk_size=chunk)
        tensors = {"q": q.cpu(), "k": k.cpu(), "v": v.cpu()}
        if gated:
            tensors["log_g"] = log_g.float().cpu()
        src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file(tensors, src)
        cmd = [args.binary, "apply", "--input", src, "--output", dst, "--backend", args.backend]
        if chunk:
            cmd += ["--chunk", str(chunk)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ours = load_file(dst)["out"]
        ref = naive(q, k, v, log_g)
        e = rel(ours, theirs.cpu())
        worst = max(worst, e)
        print(f"{name:32s} ours vs Manifest {e:.2e} | ours vs f64 {rel(ours, ref.cpu()):.2e} | "
              f"Manifest vs f64 {rel(theirs, ref):.2e} | out dtype {ours.dtype}", flush=True)
print(f"worst ours vs Manifest: {worst:.2e}")
sys.exit(0 if worst <= 1e-2 else 1)
