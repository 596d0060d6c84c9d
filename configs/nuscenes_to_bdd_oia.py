r"""DriVLM at real scale: nuScenes-Drive -> BDD-OIA (cross-dataset, shared action space).

Source is a nuScenes (+ DriveLM) folder, target a BDD-OIA folder: the four actions and 21
explanations are the shared label space (nuScenes actions come from the ego path).
  python -m drivlm_jax.train --config configs/nuscenes_to_bdd_oia.py:method=drivlm_teacher \\
      --workdir gs://BUCKET/nuscenes_to_bdd_oia/teacher --config.data.source_dir=SRC --config.data.target_dir=TGT
  python -m drivlm_jax.train --config configs/nuscenes_to_bdd_oia.py:method=drivlm,teacher=gs://BUCKET/nuscenes_to_bdd_oia/teacher \\
      --workdir gs://BUCKET/nuscenes_to_bdd_oia/student --config.data.source_dir=SRC --config.data.target_dir=TGT

Variants (`:name=value,...`): method=source_only|drivlm_teacher|drivlm_student|drivlm|oracle,
teacher=DIR (a run or an HF LLaVA directory), model=<preset in configs/common.py>, steps=N,
init=DIR (a run or an HF LLaVA directory to start from), tune=full|freeze_vision|freeze_lm|
lora_lm|lora_lm_freeze_vision (common.finetune). Ablations: see common.add_method.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="", method="source_only", steps=20000, teacher="",
                        init="", tune="full")
  return common.real_config(arg, "nuScenes-Drive -> BDD-OIA (cross-dataset, shared action space)")
