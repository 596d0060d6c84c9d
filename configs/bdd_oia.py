r"""DriVLM at real scale: BDD-OIA -> BDD-OIA of another condition (e.g. day -> night).

Source and target are BDD-OIA folders (e.g. split by time of day).
  python -m drivlm_jax.train --config configs/bdd_oia.py:method=drivlm_teacher \\
      --workdir gs://BUCKET/bdd_oia/teacher --config.data.source_dir=SRC --config.data.target_dir=TGT
  python -m drivlm_jax.train --config configs/bdd_oia.py:method=drivlm,teacher=gs://BUCKET/bdd_oia/teacher \\
      --workdir gs://BUCKET/bdd_oia/student --config.data.source_dir=SRC --config.data.target_dir=TGT

Variants (`:name=value,...`): method=source_only|drivlm_teacher|drivlm_student|drivlm|oracle,
teacher=DIR (a run or an HF LLaVA directory), model=<preset in configs/common.py>, steps=N,
init=DIR (a run or an HF LLaVA directory to start from), tune=full|freeze_vision|freeze_lm|
lora_lm|lora_lm_freeze_vision (common.finetune). Ablations: see common.add_method.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="", method="source_only", steps=20000, teacher="",
                        init="", tune="full")
  return common.real_config(arg, "BDD-OIA -> BDD-OIA of another condition (e.g. day -> night)")


def sweep(add):
  """`python -m experiments.sweep configs/bdd_oia.py[:method=...] --launcher tpu_vm ...`:
  three seeds at two learning rates."""
  for seed in range(3):
    for lr in (5e-5, 1e-4):
      add(seed=seed, **{"optimizer.learning_rate": lr})
