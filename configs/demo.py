# pylint: disable=line-too-long
r"""Demo: the tiny DriVLM on CPU, trained on the source domain (day) of the procedural world.

Run (smoke training until the trainer and the sim land):
  python -m drivlm_jax.demo
  python -m drivlm_jax.demo --config configs/demo.py:model=tiny,steps=100

Variants (`:name=value,...`):
  model=tiny|clip_b16_qwen05b|siglip_b16_qwen05b|clip_l14_qwen15b   model size preset
  method=source_only                                                 (more with the DriVLM issue)
  steps=N                                                            total training steps
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="tiny", method="source_only", steps=200)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = arg.method
  config.model = common.model_config(arg.model)

  config.total_steps = arg.steps
  config.batch_size = 8
  config.log_every_steps = 10
  config.eval_every_steps = arg.steps
  config.checkpoint_every_steps = arg.steps

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=5, weight_decay=1e-4, grad_clip_norm=1.0))
  config.loss = ml_collections.ConfigDict(dict(action=1.0, reason=1.0, lm=1.0))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return config
