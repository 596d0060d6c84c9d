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


METHODS = ("source_only", "drivlm_teacher", "drivlm_student", "oracle")


def get_config(arg=None):
  arg = common.parse_arg(arg, model="", method="source_only", steps=1200, teacher="")
  method = "drivlm_student" if arg.method == "drivlm" else arg.method
  if method not in METHODS:
    raise ValueError(f"method {arg.method!r}: configs/demo.py knows {', '.join(METHODS)} "
                     f"(drivlm = drivlm_student)")
  drivlm = method.startswith("drivlm")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = method
  config.model = common.model_config(arg.model or ("tiny_teacher" if method == "drivlm_teacher"
                                                   else "tiny"))
  config.model.reweight = drivlm          # instruction-guided token gates
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
      # oracle: labelled target in every batch; DriVLM: unlabelled target (for the
      # discriminators and the teacher); source_only: none.
      target_fraction={"source_only": 0.0, "oracle": 0.5}.get(method, 0.5),
      target_labelled=method == "oracle",
      max_len=128, resize="pad", augment=True, workers=0))

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=20, weight_decay=1e-4, grad_clip_norm=1.0,
      end_lr_ratio=0.05, grad_accum_steps=1, parts=[]))
  config.loss = ml_collections.ConfigDict(dict(action=1.0, reason=1.0, lm=0.5))
  # Domain-adversarial alignment: a weight per level (0 = off); the reversal ramps up by the
  # DANN schedule over the steps after `start` (fraction of training).
  w = 0.1 if drivlm else 0.0
  config.da = ml_collections.ConfigDict(dict(image=w, token=w, instance=w, consistency=0.0,
                                             focal_gamma=0.0, hidden=128, start=0.25))
  # Distillation from a frozen teacher run (any run dir of drivlm_jax.train).
  kd = 1.0 if method == "drivlm_student" else 0.0
  config.distill = ml_collections.ConfigDict(dict(
      teacher=arg.teacher, heads=kd, lm=kd, feature=kd, temperature=2.0,
      feature_kind="cosine"))
  if method == "drivlm_student" and not arg.teacher:
    raise ValueError("method=drivlm_student needs teacher=<drivlm_teacher run dir> "
                     "(python -m drivlm_jax.demo trains it first)")
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=40, num_generate=16, max_new_tokens=32,
      keep_ratio=0.5 if method == "drivlm_student" else 1.0))   # pruned student
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.rules = None                      # None: parallel.DEFAULT_RULES
  config.multihost = None                  # None: detect from the environment
  return config
