r"""Memory and compute per device for a model preset on a mesh, before paying for TPUs/GPUs.

  python -m experiments.scaling [--preset clip_b16_qwen05b] [--mesh 8,4,2] [--batch 256]
      [--seq 256] [--dtype bfloat16] [--remat] [--peak-tflops 197] [--mfu 0.4] [--check]

It also prints the finetune recipes (full, frozen vision tower or LM, LoRA on the LM) of
--preset (default clip_b16_qwen05b): LoRA and frozen parts keep no gradients or AdamW state.

With --peak-tflops (per device), the step time at --mfu of that peak is printed too.

Per device, for AdamW training with fp32 master params: params, gradients and optimizer
state (sharded by the logical-axis rules: FSDP on `embed`, tensor parallel on
`mlp`/`heads`/`vocab`), activations (Korthikanti et al. 2022: s h (34 + 5 a s / h) bytes
per layer at 16 bit; full remat keeps only each layer's input; plus the fp32 LM logits), and
training FLOPs per example (3x the forward's matmuls). --mesh is data,fsdp,tensor. --check
compiles the real train step of the CPU-sized presets on 8 CPU devices and prints XLA's
memory analysis next to the estimate.
"""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")   # --check needs a mesh (before jax starts)

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import common  # noqa: E402
from drivlm_jax import lora, optim, parallel, train  # noqa: E402
from drivlm_jax.model import vlm  # noqa: E402

GIB = 2 ** 30


def vision_flops(cfg, batch):
  """Forward matmul FLOPs of a ViT tower (patch embedding, attention, MLP)."""
  n, d, f, p = cfg.num_patches + 1, cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
  per_layer = 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d
  return batch * (cfg.num_layers * per_layer + 2 * cfg.num_patches * p * p * 3 * d)


def lm_flops(cfg, batch, t):
  """Forward matmul FLOPs of the decoder on t tokens (GQA projections, SwiGLU, logits)."""
  d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
  q, kv = cfg.num_heads * dh, cfg.num_kv_heads * dh
  per_layer = 2 * t * (2 * d * q + 2 * d * kv + 3 * d * f) + 4 * t * t * q
  return batch * (cfg.num_layers * per_layer + 2 * t * d * cfg.vocab_size)


def preset_config(preset: str, dtype: str = "float32", remat: bool = False) -> vlm.Config:
  model = common.model_config(preset)
  for part in ("vision", "language"):
    model[part].update(dtype=dtype, remat=remat)
  return vlm.config_from_dict(model)


def _mesh_splits(spec, mesh_sizes: dict, rules) -> list:
  """Mesh size that divides each dim of a param with logical `spec`."""
  table = dict(rules)
  splits = []
  for name in spec:
    axes = table.get(name) if name else None
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    splits.append(math.prod(mesh_sizes[a] for a in axes))
  return splits


def tuned(cfg: vlm.Config, tune: str = "full", rank: int = 16):
  """(shapes, logical axes, trainable mask) of the params a `configs.common.finetune`
  recipe trains: LoRA params added, frozen parts marked."""
  config = ml_collections.ConfigDict(dict(optimizer=dict(parts=[])))
  common.finetune(config, tune, rank)
  shapes = jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))
  axes = vlm.logical_axes(cfg)
  if lora.enabled(config.lora):
    axes["lora"] = lora.logical_axes(config.lora, shapes, axes)
    shapes["lora"] = jax.eval_shape(lambda k: lora.init(config.lora, shapes, k),
                                    jax.random.key(0))
  parts = list(train.optimizer_config(config, shapes).parts)
  labels = optim.part_labels(shapes, parts)
  return shapes, axes, jax.tree.map(lambda label: label != "frozen", labels)


def param_elements_per_device(cfg: vlm.Config, mesh_sizes: dict, rules,
                              tune: str = "full") -> tuple:
  """(total params, params held by one device, trainable params held by one device)."""
  shapes, axes, trainable = tuned(cfg, tune)
  specs = jax.tree.leaves(axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  total = shard = train_shard = 0
  for leaf, spec, trains in zip(jax.tree.leaves(shapes), specs, jax.tree.leaves(trainable)):
    total += leaf.size
    splits = _mesh_splits(tuple(spec) + (None,) * (leaf.ndim - len(spec)), mesh_sizes, rules)
    held = math.prod(-(-d // s) for d, s in zip(leaf.shape, splits))
    shard += held
    train_shard += held if trains else 0
  return total, shard, train_shard


def _tower_activation_bytes(part, s: int, tensor: int, remat: bool) -> float:
  """Training activations of one example in one transformer (vision tower or LM) over s
  tokens (Korthikanti et al. 2022)."""
  act = 2 if part.dtype == "bfloat16" else 4
  h, a = part.hidden_size, part.num_heads
  layer = s * h * (10 + 24 / tensor + 5 * a * s / (h * tensor)) * act / 2
  return (part.num_layers * s * h * act + layer) if remat else part.num_layers * layer


def activation_bytes(cfg: vlm.Config, seq_len: int, tensor: int, remat: bool,
                     vision: bool = True) -> float:
  """Training activations of one example (vision tower unless `vision` is False, LM, fp32
  logits)."""
  total = _tower_activation_bytes(cfg.language, seq_len, tensor, remat)
  if vision:
    total += _tower_activation_bytes(cfg.vision, cfg.vision.num_patches + 1, tensor, remat)
  return total + 2 * seq_len * cfg.language.vocab_size * 4 / tensor


def estimate(cfg: vlm.Config, mesh_sizes: dict, global_batch: int, seq_len: int,
             remat: bool = False, rules=parallel.DEFAULT_RULES, tune: str = "full") -> dict:
  """Per-device bytes (params, grads, AdamW state, activations) and FLOPs per example, for
  a finetune recipe (`tune`): gradients and AdamW moments only for what trains; a frozen
  vision tower keeps no activations for the backward pass."""
  total, shard, train_shard = param_elements_per_device(cfg, mesh_sizes, rules, tune)
  batch_split = mesh_sizes["data"] * mesh_sizes["fsdp"]
  per_device_batch = global_batch / batch_split
  flops = 3 * (vision_flops(cfg.vision, 1) + lm_flops(cfg.language, 1, seq_len))
  activations = activation_bytes(cfg, seq_len, mesh_sizes["tensor"], remat,
                                 vision=tune not in ("freeze_vision", "lora_lm_freeze_vision"))
  return {"params": total, "param_bytes": 4 * shard, "grad_bytes": 4 * train_shard,
          "optimizer_bytes": 8 * train_shard,
          "activation_bytes": per_device_batch * activations,
          "per_device_batch": per_device_batch, "train_flops_per_example": flops,
          "step_flops_per_device": flops * global_batch / math.prod(mesh_sizes.values())}


def xla_memory(cfg: vlm.Config, mesh_sizes: dict, global_batch: int, seq_len: int) -> dict:
  """XLA's memory analysis of the compiled train step (task losses, AdamW) on this host's
  devices: bytes per device of arguments (state + batch) and temporaries."""
  from experiments import bench_train  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(mesh_sizes)
  rules = parallel.DEFAULT_RULES
  shardings = parallel.param_shardings(vlm.logical_axes(cfg), mesh, rules)
  tx = optax.adamw(1e-4)
  with jax.set_mesh(mesh):
    params = jax.jit(lambda k: vlm.init(cfg, k), out_shardings=shardings)(jax.random.key(0))
    opt_shardings = parallel.like_params(jax.eval_shape(tx.init, params), params, mesh)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params)}
  batch = bench_train.fake_batch(cfg, global_batch, seq_len, np.random.default_rng(0))
  batch = parallel.put_batch(batch, parallel.batch_sharding(mesh, rules))
  step = jax.jit(train.make_train_step(cfg, tx, {"action": 1.0, "reason": 1.0, "lm": 1.0}),
                 compiler_options=train.step_compiler_options(cfg.vision.dtype,
                                                              cfg.language.dtype))
  stats = step.lower(state, batch, {}).compile().memory_analysis()
  batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(batch))
  return {"argument_bytes": stats.argument_size_in_bytes, "batch_bytes": batch_bytes,
          "temp_bytes": stats.temp_size_in_bytes}


def _row(name, est, peak, mfu):
  gib = lambda b: b / GIB
  state = est["param_bytes"] + est["grad_bytes"] + est["optimizer_bytes"]
  line = (f"{name:22s} {est['params'] / 1e6:9.1f} {gib(est['param_bytes']):8.2f} "
          f"{gib(est['optimizer_bytes']):8.2f} {gib(est['activation_bytes']):8.2f} "
          f"{gib(state + est['activation_bytes']):8.2f} "
          f"{est['train_flops_per_example'] / 1e12:10.3f}")
  if peak:
    seconds = est["step_flops_per_device"] / (peak * 1e12 * mfu)
    line += f" {seconds:8.2f}"
  return line


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default=None, help="default: every preset")
  parser.add_argument("--mesh", default="8,4,2", help="data,fsdp,tensor")
  parser.add_argument("--batch", type=int, default=256, help="global batch")
  parser.add_argument("--seq", type=int, default=256, help="LM tokens per example")
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--peak-tflops", type=float, default=None, help="per device")
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--check", action="store_true",
                      help="compare with XLA's memory analysis (CPU-sized presets)")
  args = parser.parse_args()
  mesh = dict(zip(parallel.AXES, (int(x) for x in args.mesh.split(","))))
  devices = math.prod(mesh.values())
  presets = [args.preset] if args.preset else sorted(common.MODEL_PRESETS)
  print(f"mesh {mesh} ({devices} devices), global batch {args.batch}, {args.seq} LM tokens, "
        f"{args.dtype} compute, fp32 master params + AdamW, remat {args.remat}")
  print(f"{'preset':22s} {'M params':>9s} {'params':>8s} {'adam':>8s} {'activ.':>8s} "
        f"{'total':>8s} {'TFLOP/ex':>10s}" + (f" {'step s':>8s}" if args.peak_tflops else "")
        + "   (GiB per device; total includes gradients)")
  for name in presets:
    cfg = preset_config(name, args.dtype, args.remat)
    print(_row(name, estimate(cfg, mesh, args.batch, args.seq, args.remat),
               args.peak_tflops, args.mfu))
  preset = args.preset or "clip_b16_qwen05b"
  print(f"\nfinetune recipes (configs/common.py finetune, LoRA rank 16) of {preset}:")
  cfg = preset_config(preset, args.dtype, args.remat)
  for tune in common.RECIPES:
    print(_row(tune, estimate(cfg, mesh, args.batch, args.seq, args.remat, tune=tune),
               args.peak_tflops, args.mfu))
  if args.check:
    check_mesh, batch, seq = {"data": 2, "fsdp": 2, "tensor": 2}, 16, 128
    print(f"\nXLA check: the compiled train step on {jax.device_count()} CPU devices, mesh "
          f"{check_mesh}, batch {batch}, {seq} tokens, fp32 (MiB per device)")
    print(f"{'preset':14s} {'state est':>10s} {'state XLA':>10s} {'act+grad est':>13s} "
          f"{'temp XLA':>10s}")
    for name in ("tiny", "tiny_teacher"):
      cfg = preset_config(name)
      est = estimate(cfg, check_mesh, batch, seq)
      xla = xla_memory(cfg, check_mesh, batch, seq)
      mib = lambda b: b / 2 ** 20
      print(f"{name:14s} {mib(est['param_bytes'] + est['optimizer_bytes']):10.2f} "
            f"{mib(xla['argument_bytes'] - xla['batch_bytes']):10.2f} "
            f"{mib(est['activation_bytes'] + est['grad_bytes']):13.2f} "
            f"{mib(xla['temp_bytes']):10.2f}")


if __name__ == "__main__":
  main()
