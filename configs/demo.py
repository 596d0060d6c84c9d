# pylint: disable=line-too-long
r"""Demo: the tiny DriVLM on CPU with the procedural world as data.

Source domain: day; target domain: night+fog (same scene distribution, other appearance).
Run (`python -m drivlm_jax.demo` runs both methods and prints a summary):
  python -m drivlm_jax.train --config configs/demo.py --workdir /tmp/drivlm/source_only
  python -m drivlm_jax.train --config configs/demo.py:method=oracle --workdir /tmp/drivlm/oracle
  python -m drivlm_jax.evaluate --config configs/demo.py --workdir /tmp/drivlm/source_only

Variants (`:name=value,...`):
  method=source_only|oracle   source_only trains on labelled source only; oracle also on the
                              labelled target (the upper bound adaptation is measured against)
  model=tiny|clip_b16_qwen05b|siglip_b16_qwen05b|clip_l14_qwen15b
  steps=N                     total training steps
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="tiny", method="source_only", steps=1200)
  if arg.method not in ("source_only", "oracle"):
    raise ValueError(f"method {arg.method!r}: configs/demo.py knows source_only and oracle")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = arg.method
  config.model = common.model_config(arg.model)
  config.mixed_precision = False          # True: bf16 compute, fp32 master params

  config.total_steps = arg.steps
  config.batch_size = 16
  config.log_every_steps = 10
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 200
  config.max_checkpoints = 3

  config.data = ml_collections.ConfigDict(dict(
      sim=True,                            # write the procedural world into cache_dir
      cache_dir="",                        # default: <workdir>/data
      width=256, height=144,               # sim image size
      source=dict(domain="day", seed=0, train=640, test=200),
      target=dict(domain="night+fog", seed=1, train=640, test=200),
      target_fraction=0.5 if arg.method == "oracle" else 0.0,
      target_labelled=arg.method == "oracle",
      max_len=128, resize="pad", augment=True, workers=0))

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=20, weight_decay=1e-4, grad_clip_norm=1.0,
      end_lr_ratio=0.05, grad_accum_steps=1, parts=[]))
  config.loss = ml_collections.ConfigDict(dict(action=1.0, reason=1.0, lm=0.5))
  # Domain-adversarial alignment (weights 0 = off; the DriVLM method issue sets them).
  config.da = ml_collections.ConfigDict(dict(image=0.0, token=0.0, instance=0.0,
                                             consistency=0.0, focal_gamma=0.0, hidden=128))
  config.eval = ml_collections.ConfigDict(dict(batch_size=40, num_generate=16, max_new_tokens=32))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.rules = None                      # None: parallel.DEFAULT_RULES
  config.multihost = None                  # None: detect from the environment
  return config
