r"""Forward latency of our jitted model vs HF transformers + PyTorch, same weights, one run.

  python -m experiments.bench_model [--only vision|lm] [--pairs 5] [--batches 1,8]
      [--out bench_model.json]

Cases (random weights, fp32): CLIP ViT-B/16 vision tower at 224 px; Qwen2-0.5B-shaped LM
prefill of 256 tokens (all-position logits, as HF computes them); each at batch 1 and 8.
Rules (../shared/DESIGN.md, "Benchmarking rules"): torch at its best (inference_mode,
threads = cores, OMP_WAIT_POLICY=PASSIVE), ours and the peer alternated A B A B, medians and
the median per-pair ratio, warm-up/compile time apart, peak RSS, and achieved GFLOP/s against
this machine's fp32 GEMM peak (2048^3; 8192^3 on a GPU) measured in the same run. Where JAX
computes on an NVIDIA GPU, torch runs there too, in JAX's float32 matmul precision
(`experiments.peer`).
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
# On a GPU JAX would take 75% of its memory up front; torch shares it (`experiments.peer`).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import common  # noqa: E402
from drivlm_jax import hf, timing  # noqa: E402
from drivlm_jax.model import language, layers, vision  # noqa: E402
from experiments import machine, peer as peer_lib  # noqa: E402
from experiments.scaling import lm_flops, vision_flops  # noqa: E402


def gemm_peak(where, n=2048, repeats=5):
  """Best fp32 GFLOP/s of an n^3 matmul as our layers run it (`layers.einsum`: XLA's dot, or
  MKL's on an Intel CPU) and in torch on `where`, and on CPU the threads each really ran it
  on (`machine.busy_threads`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x: layers.einsum("mk,kn->mn", x, x))
  mm(a).block_until_ready()
  jax_t = min(timing.timed(lambda: mm(a).block_until_ready()) for _ in range(repeats))
  b = torch.randn(n, n, device=where)
  torch_mm = peer_lib.synced(lambda: b @ b, where)
  with torch.inference_mode():
    torch_mm()
    torch_t = min(timing.timed(torch_mm) for _ in range(repeats))
    threads = None if where != "cpu" else {
        "jax": machine.busy_threads(lambda: [mm(a).block_until_ready()
                                             for _ in range(repeats)]),
        "torch": machine.busy_threads(lambda: [torch_mm() for _ in range(repeats)])}
  flops = 2 * n ** 3
  return {"jax": flops / jax_t / 1e9, "torch": flops / torch_t / 1e9}, threads


def attention_matmul_rate(where, batch=8, heads=12, tokens=197, head_dim=64, repeats=20):
  """Best fp32 GFLOP/s of the attention scores' batched matmul (q k^T per batch and head)
  at ViT-B/16's shapes, as our layers run it and in torch: small matmuls, batched, where the
  libraries differ most (docs/benchmarks.md, the Intel table's notes)."""
  q, k = (jax.random.normal(jax.random.key(i), (batch, heads, tokens, head_dim))
          for i in range(2))
  scores = jax.jit(lambda a, b: layers.einsum("bhqd,bhkd->bhqk", a, b))
  scores(q, k).block_until_ready()
  jax_t = min(timing.timed(lambda: scores(q, k).block_until_ready()) for _ in range(repeats))
  tq, tk = (torch.from_numpy(np.asarray(x)).to(where) for x in (q, k))
  torch_scores = peer_lib.synced(lambda: tq @ tk.transpose(-1, -2), where)
  with torch.inference_mode():
    torch_scores()
    torch_t = min(timing.timed(torch_scores) for _ in range(repeats))
  flops = 2 * batch * heads * tokens ** 2 * head_dim
  return {"jax": flops / jax_t / 1e9, "torch": flops / torch_t / 1e9}


def bench_vision(tmp, batches, pairs, where):
  preset = common.MODEL_PRESETS["clip_b16_qwen05b"]["vision"]
  hf_cfg = transformers.CLIPVisionConfig(
      hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
      num_hidden_layers=preset["num_layers"], num_attention_heads=preset["num_heads"],
      image_size=preset["image_size"], patch_size=preset["patch_size"])
  torch.manual_seed(0)
  peer = transformers.CLIPVisionModel(hf_cfg).eval()
  path = os.path.join(tmp, "vision")
  peer.save_pretrained(path)
  peer.to(where)
  cfg, params = hf.load_vision_tower(path)
  fwd = jax.jit(lambda p, x: vision.apply(cfg, p, x)["pooled"])
  rows = []
  for batch in batches:
    x = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(where)
    xj = jnp.asarray(x)

    def peer_call():
      with torch.inference_mode():
        peer(pixel_values=xt)

    row = timing.paired(lambda: fwd(params, xj).block_until_ready(),
                        peer_lib.synced(peer_call, where), pairs)
    with torch.inference_mode():
      diff = float(np.abs(np.asarray(fwd(params, xj)) - peer(pixel_values=xt).pooler_output
                          .cpu().numpy()).max())
    rows.append({"case": "vision CLIP ViT-B/16 224px", "batch": batch,
                 "gflop": vision_flops(cfg, batch) / 1e9, "max_abs_diff": diff, **row})
  return rows


def bench_lm(tmp, batches, pairs, where, length=256):
  preset = common.MODEL_PRESETS["clip_b16_qwen05b"]["language"]
  hf_cfg = transformers.Qwen2Config(
      vocab_size=preset["vocab_size"], hidden_size=preset["hidden_size"],
      intermediate_size=preset["intermediate_size"], num_hidden_layers=preset["num_layers"],
      num_attention_heads=preset["num_heads"], num_key_value_heads=preset["num_kv_heads"],
      rms_norm_eps=preset["rms_norm_eps"], tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": preset["rope_theta"]})
  torch.manual_seed(0)
  peer = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  path = os.path.join(tmp, "lm")
  peer.save_pretrained(path)
  peer.to(where)
  cfg, params = hf.load_language_model(path)
  fwd = jax.jit(lambda p, ids: language.apply(cfg, p, ids))
  rows = []
  for batch in batches:
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    ids_t, ids_j = torch.from_numpy(ids).long().to(where), jnp.asarray(ids)

    def peer_call():
      with torch.inference_mode():
        peer(input_ids=ids_t)

    row = timing.paired(lambda: fwd(params, ids_j).block_until_ready(),
                        peer_lib.synced(peer_call, where), pairs)
    with torch.inference_mode():
      diff = float(np.abs(np.asarray(fwd(params, ids_j)[:, -1]) -
                          peer(input_ids=ids_t).logits[:, -1].cpu().numpy()).max())
    rows.append({"case": f"LM Qwen2-0.5B prefill {length} tok", "batch": batch,
                 "gflop": lm_flops(cfg, batch, length) / 1e9, "max_abs_diff": diff, **row})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=["vision", "lm"])
  parser.add_argument("--pairs", type=int, default=5)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--out", default="bench_model.json")
  args = parser.parse_args()
  threads = os.cpu_count()
  device = peer_lib.setup()
  batches = [int(b) for b in args.batches.split(",")]
  # On a GPU a 2048^3 matmul times its launch, not the GPU's rate.
  gemm_n = 2048 if device == "cpu" else 8192
  peak, busy = gemm_peak(device, gemm_n)
  attention = attention_matmul_rate(device)
  where = peer_lib.describe(device)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if args.only in (None, "vision"):
      rows += bench_vision(tmp, batches, args.pairs, device)
    if args.only in (None, "lm"):
      rows += bench_lm(tmp, batches, args.pairs, device)
  best = max(peak.values())
  for row in rows:
    row["ours_gflops"] = row["gflop"] / (row["ours_ms"] / 1e3)
    row["peer_gflops"] = row["gflop"] / (row["peer_ms"] / 1e3)
  result = {"machine": where, "threads_set": threads if device == "cpu" else None,
            "threads_busy": busy,
            "gemm_n": gemm_n, "gemm_peak_gflops": peak, "attention_matmul_gflops": attention,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "rows": rows}
  print(f"machine: {machine.line(where)}")
  fp32 = peer_lib.float32_matmuls(device)
  if device == "cpu":
    theoretical = where["cpu"]["fp32_peak_gflops"]
    print(f"fp32 GEMM {gemm_n}^3: jax {peak['jax']:.0f} GFLOP/s on {busy['jax']} busy threads, "
          f"torch {peak['torch']:.0f} GFLOP/s on {busy['torch']} (set {threads}); theoretical "
          f"peak {theoretical or float('nan'):.0f} GFLOP/s; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
  else:
    gpu = where["accelerator"]
    print(f"{fp32} GEMM {gemm_n}^3 on {gpu['torch_device']}: jax {peak['jax']:.0f} GFLOP/s, "
          f"torch {peak['torch']:.0f} GFLOP/s (JAX_DEFAULT_MATMUL_PRECISION "
          f"{gpu['jax_default_matmul_precision'] or 'unset'}, torch "
          f"{gpu['torch_float32_matmul_precision']})")
  print(f"attention scores, 96 batched 197x64x197 {fp32} matmuls: jax {attention['jax']:.0f}, "
        f"torch {attention['torch']:.0f} GFLOP/s")
  header = (f"{'case':34s} {'batch':>5s} {'ours ms':>9s} {'torch ms':>9s} {'torch/ours':>10s} "
            f"{'ours %peak':>10s} {'torch %peak':>11s} {'compile s':>9s} {'max|diff|':>9s}")
  print(header)
  for r in rows:
    print(f"{r['case']:34s} {r['batch']:5d} {r['ours_ms']:9.1f} {r['peer_ms']:9.1f} "
          f"{r['ratio_peer_over_ours']:10.2f} {100 * r['ours_gflops'] / best:9.0f}% "
          f"{100 * r['peer_gflops'] / best:10.0f}% {r['ours_first_call_s']:9.1f} "
          f"{r['max_abs_diff']:9.1e}")
  print(f"peak RSS of this process ({'both models' if device == 'cpu' else 'host memory'}): "
        f"{result['peak_rss_gb']:.1f} GiB")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
