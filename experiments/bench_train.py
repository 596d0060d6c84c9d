r"""Training throughput of our jitted step vs an equivalent HF transformers + PyTorch step,
same shapes, AdamW, fp32 (one case in bf16 mixed precision on both sides), alternated in one
run.

  python -m experiments.bench_train [--pairs 5] [--warmup-pairs 3] [--out bench_train.json]
      [--scale 1]
      [--cases vlm_tiny,vit_b16,vit_b16_bf16,loop,demo_loop,qwen2_6l,qwen2_6l_bf16]

Cases:
  vlm_tiny   the demo config's model (CLIP 64px/8 + Qwen2 2x64, batch 16, 128 tokens): our
             `vlm.apply` + task losses vs transformers' LlavaForConditionalGeneration with
             the same towers plus the same attention-pooling heads in torch.
  vit_b16    CLIP ViT-B/16 at 224 px + a 4-way head, batch 8 (DESIGN's reference case).
  vit_b16_bf16  the same in mixed precision, same dtype against same dtype: our bf16
             compute with fp32 params and optimizer (`config.mixed_precision`) vs torch's
             `autocast(bfloat16)` with fp32 params (its CPU AMP recipe).
  qwen2_6l   next-token training of a Qwen2-0.5B-shaped decoder (6 of its 24 layers, vocab
             8192), batch 4 x 256 tokens, vs transformers' Qwen2ForCausalLM; qwen2_6l_bf16
             the same in mixed precision vs autocast. On request only.
  loop       the demo config's training loop on the sim: the host in lockstep with each
             step (the old loop) vs overlapped (the trainer's), steps/s side by side. On one
             CPU device the restarted process runs each step inline (`drivlm_jax.host`), so
             only the pipeline's own threads overlap with it, in both.
  demo_loop  the demo's own trainer (`drivlm_jax.train.train`, source_only on the sim:
             pipeline, placement, EMA, logging) at the examples/s it logs, against vlm_tiny's
             bare jitted step (same model and batch), timed alone in windows of the trainer's
             log interval right before and right after it: their ratio (`experiments.bench`
             runs it in a process of its own, as a trainer runs).
torch runs at its best: threads = cores, OMP_WAIT_POLICY=PASSIVE, no autograd anomaly mode.
Each case alternates `--warmup-pairs` untimed pairs (their times are in the JSON) before the
timed ones: with both frameworks in one process, the first JAX steps after torch's first ones
run slow while the process's memory grows (the ViT-B/16 case on a 2-core Xeon, 2026-12-04:
ours 5.98, 5.43, 4.04, 3.74, 3.78 s, RSS 5.9 -> 7.0 GB, torch steady at 3.4-3.6 s); a user's
trainer has no torch beside it.
Where JAX computes on an NVIDIA GPU, torch trains there too, in JAX's float32 matmul
precision, and autocast is CUDA's (`experiments.peer`); `--scale` multiplies the batches.
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# On a GPU JAX would take 75% of its memory up front; torch shares it (`experiments.peer`).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import common, demo  # noqa: E402
from drivlm_jax import timing, train  # noqa: E402
from drivlm_jax.model import language, vision, vlm  # noqa: E402
from experiments import peer as peer_lib  # noqa: E402


class TorchHeads(torch.nn.Module):
  """The same heads as `vlm.Heads`: probe attention pooling, then LN-MLP per head."""

  def __init__(self, d, heads, hidden):
    super().__init__()
    self.probe = torch.nn.Parameter(torch.randn(1, 1, d))
    self.pool = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    self.action = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, hidden),
                                      torch.nn.GELU(), torch.nn.Linear(hidden, 4))
    self.reason = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, hidden),
                                      torch.nn.GELU(), torch.nn.Linear(hidden, 21))

  def forward(self, tokens):
    pooled = self.pool(self.probe.expand(len(tokens), -1, -1), tokens, tokens)[0][:, 0]
    return self.action(pooled), self.reason(pooled)


def fake_batch(cfg, batch, length, rng):
  """A random training batch of the model's shapes (every BATCH_KEY the task losses use)."""
  n = cfg.num_visual_tokens
  ids = rng.integers(10, cfg.language.vocab_size, (batch, length)).astype(np.int32)
  ids[:, 1:1 + n] = cfg.image_token_id
  loss_mask = np.zeros((batch, length), np.float32)
  loss_mask[:, n + 10:] = 1
  return {"image": rng.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
          .astype(np.float32), "input_ids": ids, "attention_mask": np.ones_like(ids),
          "targets": np.roll(ids, -1, 1), "loss_mask": loss_mask,
          "actions": rng.integers(0, 2, (batch, 4)).astype(np.float32),
          "reasons": rng.integers(0, 2, (batch, 21)).astype(np.float32),
          "action_mask": np.ones(batch, np.float32), "reason_mask": np.ones(batch, np.float32),
          "instruction_ids": ids[:, n + 1:n + 9], "instruction_mask": np.ones((batch, 8),
                                                                              np.int32)}


def vlm_tiny_step(batch_size, length=128):
  """(our jitted demo-model train step as a callable, its cfg, the batch's numpy arrays)."""
  cfg = vlm.config_from_dict(demo.get_config().model)
  data = fake_batch(cfg, batch_size, length, np.random.default_rng(0))
  params = vlm.init(cfg, jax.random.key(0))
  tx = optax.adamw(1e-4)
  # The state is donated, as the trainer does: XLA updates it in place, as torch does.
  step = jax.jit(train.make_train_step(cfg, tx, {"action": 1.0, "reason": 1.0, "lm": 1.0}),
                 donate_argnums=0, compiler_options=train.step_compiler_options(
                     cfg.vision.dtype, cfg.language.dtype))
  state = [{"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}]
  jbatch = {k: jnp.asarray(v) for k, v in data.items()}

  def ours():
    state[0], _ = step(state[0], jbatch, {})
    jax.block_until_ready(state[0])
  return ours, cfg, data


def case_vlm_tiny(batch_size, length=128, *, where="cpu"):
  ours, cfg, data = vlm_tiny_step(batch_size, length)
  v, l = cfg.vision, cfg.language
  hf = transformers.LlavaConfig(
      vision_config=dict(model_type="clip_vision_model", image_size=v.image_size,
                         patch_size=v.patch_size, hidden_size=v.hidden_size,
                         intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                         num_attention_heads=v.num_heads),
      text_config=dict(model_type="qwen2", vocab_size=l.vocab_size, hidden_size=l.hidden_size,
                       intermediate_size=l.intermediate_size, num_hidden_layers=l.num_layers,
                       num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
                       tie_word_embeddings=l.tie_word_embeddings),
      image_token_index=cfg.image_token_id, image_seq_length=cfg.num_visual_tokens,
      vision_feature_layer=-1, vision_feature_select_strategy="default",
      tie_word_embeddings=l.tie_word_embeddings)
  model = transformers.LlavaForConditionalGeneration(hf).train().to(where)
  heads = TorchHeads(l.hidden_size, l.num_heads, cfg.head_hidden).to(where)
  opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-4)
  t = {k: torch.from_numpy(v).to(where) for k, v in data.items()}
  pixels = t["image"].permute(0, 3, 1, 2).contiguous()
  ids = t["input_ids"].long()

  def peer():
    # LLaVA's forward, spelled out so that the visual tokens feed the heads too (one pass).
    tokens = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    tokens = tokens.reshape(batch_size, -1, l.hidden_size)
    embeds = model.model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == cfg.image_token_id)[..., None], tokens)
    hidden = model.model.language_model(inputs_embeds=embeds,
                                        attention_mask=t["attention_mask"]).last_hidden_state
    logits = model.lm_head(hidden)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t["targets"].long().flatten(),
                                           reduction="none")
    lm = (ce * t["loss_mask"].flatten()).sum() / t["loss_mask"].sum()
    action, reason = heads(tokens)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = lm + bce(action, t["actions"]) + bce(reason, t["reasons"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  return ours, peer, {"batch": batch_size, "tokens": length}


def case_vit_b16(batch_size, dtype="float32", *, where="cpu"):
  cfg = vision.Config(**common.MODEL_PRESETS["clip_b16_qwen05b"]["vision"], dtype=dtype)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch_size, 224, 224, 3)).astype(np.float32)
  labels = rng.integers(0, 2, (batch_size, 4)).astype(np.float32)
  params = {"tower": vision.init(cfg, jax.random.key(0)),
            "head": {"w": jnp.zeros((cfg.hidden_size, 4)), "b": jnp.zeros(4)}}
  tx = optax.adamw(1e-4)

  # In place (donated) and compiled as the trainer does.
  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     compiler_options=train.step_compiler_options(dtype))
  def step(params, opt_state, images, labels):
    def loss(p):
      pooled = vision.apply(cfg, p["tower"], images)["pooled"]
      logits = pooled @ p["head"]["w"] + p["head"]["b"]
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state = [params, tx.init(params)]
  ji, jl = jnp.asarray(images), jnp.asarray(labels)

  def ours():
    state[:] = step(state[0], state[1], ji, jl)
    jax.block_until_ready(state[0])

  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size)).train().to(where)
  assert sum(p.numel() for p in model.parameters()) == sum(
      x.size for x in jax.tree.leaves(state[0]["tower"])), "towers differ in size"
  head = torch.nn.Linear(768, 4).to(where)
  opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-4)
  ti = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(where)
  tl = torch.from_numpy(labels).to(where)

  def peer():
    with torch.autocast(where, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = head(model(pixel_values=ti).pooler_output)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), tl)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  return ours, peer, {"batch": batch_size, "compute_dtype": dtype}


def case_lm(batch_size, length=256, num_layers=6, dtype="float32", *, where="cpu"):
  """Next-token training of a Qwen2-0.5B-shaped decoder: `num_layers` of its 24 layers, its
  widths and heads, an 8192-token vocabulary (the tied head would otherwise dominate)."""
  lang = {**common.MODEL_PRESETS["clip_b16_qwen05b"]["language"], "vocab_size": 8192,
          "num_layers": num_layers}
  cfg = language.Config(**lang, dtype=dtype)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_size, length))
  params = language.init(cfg, jax.random.key(0))
  tx = optax.adamw(1e-4)

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     compiler_options=train.step_compiler_options(dtype))
  def step(params, opt_state, ids):
    def loss(p):
      logits = language.apply(cfg, p, ids)[:, :-1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state, jids = [params, tx.init(params)], jnp.asarray(ids, jnp.int32)

  def ours():
    state[:] = step(state[0], state[1], jids)
    jax.block_until_ready(state[0])

  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})).train().to(where)
  assert sum(p.numel() for p in model.parameters()) == sum(
      x.size for x in jax.tree.leaves(params)), "models differ in size"
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tids = torch.from_numpy(ids).to(where)

  def peer():
    with torch.autocast(where, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(tids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                             tids[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  return ours, peer, {"batch": batch_size, "tokens": length, "layers": num_layers,
                      "compute_dtype": dtype}


def loop_overlap(steps=20, rounds=3) -> dict:
  """Steps/s of the demo config's training loop on the sim (real pipeline, real step), with
  the host in lockstep (read the loss of each step, then prepare the next batch: the old
  loop) vs overlapped (dispatch the step, prepare the next batch while it runs, read the
  previous step's loss: `drivlm_jax.train`'s loop); rounds alternate the two."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from drivlm_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  from drivlm_jax.data import sources  # pylint: disable=import-outside-toplevel
  config = demo.get_config("method=source_only")
  config.data.cache_dir = tempfile.mkdtemp()
  config.data.source.update(train=64, test=8)
  config.data.target.update(train=64, test=8)
  cfg = run_lib.model_config(config)
  data = sources.prepare(config.data, config.data.cache_dir)
  feats = run_lib.features(config, cfg, data["tokenizer"])
  tx = optax.adamw(1e-4)
  step = jax.jit(train.make_train_step(cfg, tx, dict(config.loss)), donate_argnums=0,
                 compiler_options=train.step_compiler_options(cfg.vision.dtype,
                                                              cfg.language.dtype))
  params = vlm.init(cfg, jax.random.key(0))
  state = [{"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}]
  place = lambda b: {k: jnp.asarray(b[k]) for k in train.BATCH_KEYS}

  def lockstep():
    batches = iter(train.train_batches(config, data, feats, 0))
    for _ in range(steps):
      state[0], metrics = step(state[0], place(next(batches)), {})
      float(metrics["loss"])

  def overlapped():
    batches = iter(train.train_batches(config, data, feats, 0))
    batch, previous = place(next(batches)), None
    for i in range(steps):
      state[0], metrics = step(state[0], batch, {})
      if i + 1 < steps:
        batch = place(next(batches))
      if previous is not None:
        float(previous["loss"])
      previous = metrics
    float(previous["loss"])

  times = timing.interleaved({"lockstep": lockstep, "overlapped": overlapped}, 1, rounds)
  out = {k: steps / statistics.median(v) for k, v in times.items()}
  return {"case": "loop", "steps": steps, "rounds": rounds, "batch": config.batch_size,
          "lockstep_steps_per_s": out["lockstep"], "overlapped_steps_per_s": out["overlapped"],
          "ratio_overlapped_over_lockstep": out["overlapped"] / out["lockstep"]}


def demo_loop(step, batch, steps=150, windows=7) -> dict:
  """The trainer's logged examples/s on the demo config (source_only, the sim, `steps` steps;
  the median over its log windows after the first, which holds the compile) against vlm_tiny's
  bare jitted `step` (same model and batch) in windows of as many steps as the trainer logs,
  `windows` of them right before the trainer and as many right after it: this virtual
  machine's clock drifts by up to a third within minutes, so a step timed earlier in the run
  (vlm_tiny's row, 3 steps alternated with torch) is no measure of the loop's own minute."""
  import tempfile  # pylint: disable=import-outside-toplevel
  workdir = tempfile.mkdtemp()
  config = demo.get_config(f"method=source_only,steps={steps}")
  config.data.cache_dir = os.path.join(workdir, "data")
  config.data.source.update(train=256, test=8)
  config.data.target.update(train=256, test=8)

  def rate():   # examples/s of `windows` runs of as many bare steps as a log window holds
    window = lambda: [step() for _ in range(config.log_every_steps)]
    return [batch * config.log_every_steps / t
            for t in timing.interleaved({"bare": window}, 0, windows)["bare"]]

  before = rate()
  train.train(config, workdir)
  after = rate()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [json.loads(line)["examples_per_s"] for line in f][1:]
  loop, bare = statistics.median(rates), statistics.median(before + after)
  return {"case": "demo_loop", "steps": steps, "batch": config.batch_size,
          "log_windows": len(rates), "loop_examples_per_s": loop,
          "step_examples_per_s": bare, "step_examples_per_s_before": statistics.median(before),
          "step_examples_per_s_after": statistics.median(after),
          "ratio_loop_over_step": loop / bare}


CASES = ("vlm_tiny", "vit_b16", "vit_b16_bf16", "loop", "demo_loop")
TINY_BATCH = 16   # vlm_tiny's batch: the demo's
EXTRA_CASES = ("qwen2_6l", "qwen2_6l_bf16")   # on request only (not in `experiments.bench`)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=5)
  parser.add_argument("--warmup-pairs", type=int, default=3)
  parser.add_argument("--out", default="bench_train.json")
  parser.add_argument("--scale", type=int, default=1,
                      help="multiplies the batch of vlm_tiny, vit_b16 and qwen2_6l (a GPU "
                      "idles at the CPU's batches)")
  known = CASES + EXTRA_CASES
  parser.add_argument("--cases", default=",".join(CASES),
                      help=f"comma-separated subset of {','.join(known)} (default: "
                      f"{','.join(CASES)})")
  args = parser.parse_args()
  cases = args.cases.split(",")
  if set(cases) - set(known):
    parser.error(f"--cases {args.cases!r}: a subset of {','.join(known)}")
  if args.scale < 1:
    parser.error(f"--scale {args.scale}: a positive integer")
  device, k = peer_lib.setup(), args.scale
  rows, bare_vlm_tiny = [], None
  for name, make in (("vlm_tiny", lambda: case_vlm_tiny(k * TINY_BATCH, where=device)),
                     ("vit_b16", lambda: case_vit_b16(k * 8, where=device)),
                     ("vit_b16_bf16", lambda: case_vit_b16(k * 8, "bfloat16", where=device)),
                     ("qwen2_6l", lambda: case_lm(k * 4, where=device)),
                     ("qwen2_6l_bf16", lambda: case_lm(k * 4, dtype="bfloat16", where=device))):
    if name not in cases:
      continue
    ours, peer, info = make()
    bare_vlm_tiny = ours if name == "vlm_tiny" and k == 1 else bare_vlm_tiny
    t = timing.paired(ours, peer_lib.synced(peer, device), args.pairs, args.warmup_pairs)
    batch = info["batch"]
    first_ours, first_peer = t["ours_first_call_s"], t["peer_first_call_s"]
    row = {"case": name, **info, "ours_examples_per_s": 1e3 * batch / t["ours_ms"],
           "peer_examples_per_s": 1e3 * batch / t["peer_ms"],
           "ratio_ours_over_peer": t["ratio_peer_over_ours"],
           "ours_first_step_s": first_ours, "peer_first_step_s": first_peer,
           "ours_warmup_steps_s": t["warmup_ours_s"], "peer_warmup_steps_s": t["warmup_peer_s"]}
    rows.append(row)
    print(f"{name:12s} batch {batch:3d}: ours {row['ours_examples_per_s']:8.1f} examples/s, "
          f"torch {row['peer_examples_per_s']:8.1f} examples/s, ours/torch "
          f"{row['ratio_ours_over_peer']:.2f} (first step: ours {first_ours:.1f} s incl. "
          f"compile, torch {first_peer:.1f} s)")
  if "loop" in cases:
    row = loop_overlap()
    rows.append(row)
    print(f"loop (demo config, batch {row['batch']}): lockstep "
          f"{row['lockstep_steps_per_s']:.1f} steps/s, overlapped "
          f"{row['overlapped_steps_per_s']:.1f} steps/s, ratio "
          f"{row['ratio_overlapped_over_lockstep']:.2f}")
  if "demo_loop" in cases:
    row = demo_loop(bare_vlm_tiny or vlm_tiny_step(TINY_BATCH)[0], TINY_BATCH)
    rows.append(row)
    print(f"demo_loop (drivlm_jax.train, batch {row['batch']}): "
          f"{row['loop_examples_per_s']:.1f} examples/s logged vs the bare step's "
          f"{row['step_examples_per_s']:.1f} (before the trainer "
          f"{row['step_examples_per_s_before']:.1f}, after {row['step_examples_per_s_after']:.1f}):"
          f" loop/step {row['ratio_loop_over_step']:.2f}")
  with open(args.out, "w") as f:
    json.dump({"machine": peer_lib.describe(device),
               "threads_set": os.cpu_count() if device == "cpu" else None, "rows": rows},
              f, indent=1)


if __name__ == "__main__":
  main()
