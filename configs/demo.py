# pylint: disable=line-too-long
r"""Demo: the tiny DriVLM on CPU with the procedural world as data.

Source domain: day (labelled); target domain: night+fog (same scene distribution, other
appearance; its labels are used for evaluation only, and by the oracle).
`python -m experiments.demo` runs every method; one by one:
  python -m drivlm_jax.train --config configs/demo.py --workdir runs/so
  python -m drivlm_jax.train --config configs/demo.py:method=drivlm_teacher --workdir runs/t
  python -m drivlm_jax.train --config configs/demo.py:method=drivlm,teacher=runs/t --workdir runs/s
  python -m drivlm_jax.train --config configs/demo.py:method=oracle --workdir runs/oracle
  python -m drivlm_jax.evaluate --config configs/demo.py --workdir runs/so

Variants (`:name=value,...`):
  method=source_only|drivlm_teacher|drivlm_student|drivlm|oracle   (see common.add_method)
  teacher=DIR                 the teacher run of drivlm_student
  init=DIR                    warm-start from a run or an HF LLaVA directory
  tune=full|freeze_vision|freeze_lm|lora_lm|lora_lm_freeze_vision   (common.finetune)
  model=tiny|tiny_teacher|clip_b16_qwen05b|...   (default: tiny)
  steps=N                     total training steps (default 400)
  standardize=0|1             each image standardised over its pixels, (x - mean) / (std +
                              0.1) (model.vision.standardize; every method): off by default
  fda=BETA,fda_fraction=F     Fourier domain adaptation in the DriVLM runs (teacher and
                              student; off: 0): a share F of the source rows restyled with a
                              target row's low-frequency amplitude, window BETA
                              (adapt/fourier.py)
  shift=night_fog|rain_snow|camera|sensor   the domain shift (SHIFTS; bdd_oia layout):
                              day -> night+fog, day -> rain and snow (half each), camera
                              cam_wide -> cam_tele, day -> day through a low-cost sensor
  dataset=bdd_oia|nuscenes    the sim's layout. nuscenes: six-camera nuScenes-Drive with
                              DriveLM QA, day Boston -> night+rain Singapore; the model sees
                              all six cameras (model.num_cameras=6) and learns every DriveLM
                              QA, and the target test frames' QAs are answered and scored as
                              the DriveLM challenge scores them (evals.target_drivelm)
Own data instead of the sim: --config.data.source_dir=DIR --config.data.target_dir=DIR.
"""
import ml_collections

from configs import common

# shift -> (source domain, target domain) of the sim (drivlm_jax/sim/domains.py; "a,b": a
# mixture of domains, half each).
SHIFTS = {
    "night_fog": ("day", "night+fog"),
    "rain_snow": ("day", "rain,snow"),
    "camera": ("cam_wide", "cam_tele"),
    "sensor": ("day", "day+sensor_lowcost"),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, model="", method="source_only", steps=0, teacher="",
                         init="", tune="full", dataset="bdd_oia", shift="night_fog",
                         fda=0.0, fda_fraction=1.0, standardize=0)
  if arg.shift not in SHIFTS:
    raise ValueError(f"shift {arg.shift!r}: known {', '.join(SHIFTS)}")
  if arg.dataset not in ("bdd_oia", "nuscenes"):
    raise ValueError(f"dataset {arg.dataset!r}: 'bdd_oia' or 'nuscenes'")
  method = common.check_method(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = common.model_config(arg.model or "tiny")
  config.model.vision.standardize = bool(arg.standardize)
  config.mixed_precision = False          # True: bf16 compute, fp32 master params
  config.ema_decay = 0.99                  # evaluate the (debiased) moving average of the params

  config.total_steps = arg.steps or 400
  config.log_every_steps = 10
  config.eval_every_steps = 1000           # > total_steps: evaluated once, at the end
  config.checkpoint_every_steps = 200
  config.max_checkpoints = 3

  config.data = ml_collections.ConfigDict(dict(
      sim=True,                            # write the procedural world into cache_dir
      source_dir="", target_dir="",        # or a BDD-OIA / nuScenes folder per role
      tokenizer="",                        # default: the sim's BPE tokenizer
      cache_dir="",                        # default: <workdir>/data
      width=256, height=144,               # sim image size
      source=dict(domain=SHIFTS[arg.shift][0], seed=0, train=640, test=1000),
      target=dict(domain=SHIFTS[arg.shift][1], seed=1, train=640, test=1000),
      target_fraction=0.0, target_labelled=False,   # set by the method
      max_len=128, resize="pad", augment=True, workers=0, max_boxes=16,
      read_threads=1,                      # threads preparing batches (pipeline.READ_THREADS)
      drivelm_questions="released",        # nuScenes: the QAs trained on (pipeline.Features)
      cache_examples=4096))                # decoded, resized frames kept in memory (~12 KB each)

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate(config.model), warmup_steps=20, weight_decay=1e-4, grad_clip_norm=1.0,
      end_lr_ratio=0.05, grad_accum_steps=1, parts=[]))
  config.loss = ml_collections.ConfigDict(dict(action=1.0, reason=1.0, lm=0.5))
  config.evals = common.evals(batch_size=40, num_generate=16, max_new_tokens=32)
  if arg.dataset == "nuscenes":
    _nuscenes(config)
  common.add_method(config, method, arg.teacher, keep_ratio=0.25, init_from=arg.init,
                    fda_beta=arg.fda, fda_fraction=arg.fda_fraction)
  common.finetune(config, arg.tune)
  # Rows per step, source and target together: 16 labelled source rows for every method.
  config.batch_size = 32 if common.with_target(config) else 16
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.rules = None                      # None: parallel.DEFAULT_RULES
  config.multihost = "auto"                # "auto": from the environment; "true" | "false"
  return config


def learning_rate(model) -> float:
  """AdamW's peak rate for a model trained from scratch: 1e-3 at width 64, as 1 / width (an
  Adam step moves every weight by about the rate, so a width-w layer's output moves ~w times
  as far). Width: the wider of the vision tower and the LM.

  Chosen on the source validation split (source labels; no target label is read), day ->
  night+fog: source_only `tiny` (width 64, 400 steps) reached source action mAP 91.7 at 1e-3,
  90.5 at 5e-4 and 78.1 at 2e-3; drivlm_teacher `tiny_teacher` (width 128) 86.1 at 5e-4 and
  79.6 at 1e-3 (300 steps), 75.5 at 5e-4 and 73.2 at 2.5e-4 (200 steps); at 2e-3 its action
  loss never left the ~0.65 plateau in 600 steps (source mAP 44.2)."""
  width = max(model.vision.hidden_size, model.language.hidden_size)
  return 1e-3 * 64 / width


def _nuscenes(config):
  """Six cameras of 64 x 64 in 16 x 16 patches (96 visual tokens), nuScenes + DriveLM from
  the sim (counts in scenes of 16 keyframes; about 10 have the 3 s of future an action needs)."""
  config.model.num_cameras = 6
  config.model.vision.patch_size = 16
  # Trained on the DriveLM challenge's own questions (multiple choice included): with the
  # 96 visual tokens their prompts take up to 287 positions in the sim's tokens.
  config.data.update(sim_layout="nuscenes", nuscenes_config="six_cam", width=128, height=72,
                     max_len=320, drivelm_questions="challenge")
  config.data.source = dict(domain="day", location="boston-seaport", seed=0, train=64, test=20)
  config.data.target = dict(domain="night+rain", location="singapore-onenorth", seed=1,
                            train=64, test=20)
  config.evals.target_drivelm = dict(type="drivelm", role="target", batch_size=64,
                                     max_new_tokens=40, num_frames=40)


def sweep(add):
  """`python -m experiments.sweep configs/demo.py[:method=...]`: learning rate x seed."""
  for seed in range(3):
    for lr in (1e-3, 2e-3):
      add(seed=seed, **{"optimizer.learning_rate": lr})
