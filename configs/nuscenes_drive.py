r"""DriVLM at real scale: nuScenes-Drive -> nuScenes-Drive of another city/condition.

Source and target are nuScenes (+ DriveLM) folders (e.g. Boston -> Singapore, day -> night).
  python -m drivlm_jax.train --config configs/nuscenes_drive.py:method=drivlm_teacher \\
      --workdir gs://BUCKET/nuscenes_drive/teacher --config.data.source_dir=SRC --config.data.target_dir=TGT
  python -m drivlm_jax.train --config configs/nuscenes_drive.py:method=drivlm,teacher=gs://BUCKET/nuscenes_drive/teacher \\
      --workdir gs://BUCKET/nuscenes_drive/student --config.data.source_dir=SRC --config.data.target_dir=TGT

Variants (`:name=value,...`): method=source_only|drivlm_teacher|drivlm_student|drivlm|oracle,
teacher=DIR (a run or an HF LLaVA directory), model=<preset in configs/common.py>, steps=N,
init=DIR (a run or an HF LLaVA directory to start from), tune=full|freeze_vision|freeze_lm|
lora_lm|lora_lm_freeze_vision (common.finetune). Ablations: see common.add_method.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="", method="source_only", steps=20000, teacher="",
                        init="", tune="full")
  return common.real_config(arg, "nuScenes-Drive -> nuScenes-Drive of another city/condition")
