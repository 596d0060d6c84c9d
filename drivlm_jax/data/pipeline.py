"""tfds data sources + grain: examples -> model-ready, source/target-mixed batches.

Every global batch holds `round(global batch * target_fraction)` unlabelled target examples
beside the labelled source ones; target action/reason labels are zeroed and their masks are
0, so no task loss sees them (their annotated boxes stay: the instance-level discriminator
pools features inside them, see `adapt/alignment.py`). Host h of H (by default
`jax.process_index()` of `jax.process_count()`) takes the h-th contiguous block of each
domain's rows of each global batch, so the hosts together read what one host would; order and
augmentation are fixed by the seed.
"""
import dataclasses
import json
import sys

import grain
import jax
from absl import flags
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

import data_builders  # noqa: F401  (registers bdd_oia and nuscenes_drive with tfds)
from drivlm_jax.data import drivelm_questions, labels, preprocess
from drivlm_jax.data import tokenizer as tokenizer_lib

DEFAULT_INSTRUCTION = "What should the ego car do?"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A built dataset and the examples of it to use.

  name: "bdd_oia", "nuscenes_drive/front" or "nuscenes_drive/six_cam"; where: attribute
  filters on nuScenes-Drive, e.g. (("location", "singapore-onenorth"), ("night", True)).
  """
  name: str
  data_dir: str
  split: str = "train"
  where: tuple = ()


@dataclasses.dataclass(frozen=True)
class Features:
  """How examples become model inputs."""
  tokenizer: str                 # the sim's tokenizer.json, or a checkpoint directory
  statistics: tuple = preprocess.MEAN_STD["clip"]   # (mean, std) the frames are normalised by
  image_size: int = 224
  num_image_tokens: int = 196
  max_len: int = 256
  max_instruction_len: int = 32  # the instruction alone, for instruction-guided reweighting
  max_caption_len: int = 48      # image-text pairs for CLIP fine-tuning
  caption_tokenizer: str = ""    # a CLIP checkpoint directory: captions in its own tokens
  max_boxes: int = 16            # object boxes per example (several cameras: taken in turn)
  resize: str = "pad"            # "pad" | "crop"
  augment: bool = True
  num_cameras: int = 1           # > 1: "image" [V, S, S, 3], the example's first V cameras
  # Keep up to this many examples per domain decoded and resized in memory (resize "pad" or
  # evaluation only: a deterministic resize); 0: decode and resize every time.
  cache_examples: int = 0
  # The DriveLM QAs a nuScenes-Drive example trains on: "released", every QA of the frame as
  # the file has it; "challenge", the questions the challenge asks of the frame (picked,
  # tagged and partly made multiple choice by its extract_data.py / convert_data.py, which
  # its baseline fine-tunes on: `drivelm_questions`).
  drivelm_questions: str = "released"

  def __post_init__(self):
    # (mean, std) as tuples of floats: JSON (an export's sidecar) gives lists.
    object.__setattr__(self, "statistics",
                       tuple(tuple(float(v) for v in part) for part in self.statistics))
    if self.drivelm_questions not in QA_FORMS:
      raise ValueError(f"drivelm_questions {self.drivelm_questions!r}: one of {QA_FORMS}")


QA_FORMS = ("released", "challenge")


def qa_pairs(example, form: str) -> list:
  """[(question, answer)] an example trains on (`Features.drivelm_questions`): its stored
  QAs, or in the "challenge" form the frame's test questions (`frame_test_questions`); a
  frame of which the challenge asks nothing trains on its stored QAs."""
  qa = example.get("qa")
  if qa is None or not len(qa["question"]):
    return []
  pairs = [(as_text(q), as_text(a)) for q, a in zip(qa["question"], qa["answer"])]
  if form == "challenge":
    frame = as_text(example["sample_token"])
    asked = frame_test_questions(example, f"sample {frame}")
    pairs = [(p["Q"], p["A"]) for stage in asked.values() for p in stage] or pairs
  return [(q, a) for q, a in pairs if a]   # a questions-only file has nothing to learn


def frame_test_questions(example, where: str) -> dict:
  """A nuScenes-Drive example's DriveLM test QAs {stage: [{"Q", "A", "tag"}]}: as stored
  where its QA file carries the challenge's tags (a test_eval.json), else picked and
  converted as the challenge's scripts do from a released file (`drivelm_questions`; an
  answer outside the challenge's options is an error naming the frame, as the scripts
  fail)."""
  qa, stages = example["qa"], {}
  for k in range(len(qa["question"])):
    stages.setdefault(as_text(qa["type"][k]), []).append(
        {"Q": as_text(qa["question"][k]), "A": as_text(qa["answer"][k]),
         "tag": labels.drivelm_tags(qa["tag"][k])})
  return drivelm_questions.frame_questions(
      stages, json.loads(as_text(example["key_objects"])), as_text(example["sample_token"]),
      where)


def as_text(value) -> str:
  """A tfds text feature (bytes) or a str, as str."""
  return value.decode() if isinstance(value, bytes) else str(value)


def _matches(example, where) -> bool:
  for key, value in where:
    got = example[key]
    got = (as_text(got) if isinstance(got, bytes) else
           bool(got) if isinstance(value, bool) else got)
    if got != value:
      return False
  return True


def open_source(spec: SourceSpec):
  """-> (tfds data source, indices of the examples that match `spec.where`)."""
  source = tfds.data_source(spec.name, data_dir=spec.data_dir, split=spec.split)
  indices = np.arange(len(source))
  if spec.where:
    indices = np.array([i for i in indices if _matches(source[int(i)], spec.where)], np.int64)
  if len(indices) == 0:
    raise ValueError(f"{spec.name} {spec.split} in {spec.data_dir}: no example matches "
                     f"{dict(spec.where)}")
  return source, indices


def camera_images(example, num_cameras: int = 1) -> list:
  """The example's first `num_cameras` camera images (BDD-OIA has one, "image"; nuScenes-
  Drive a list, "images", six in its six_cam config, CAM_FRONT first)."""
  images = [example["image"]] if "image" in example else list(example["images"])
  if len(images) < num_cameras:
    raise ValueError(f"example {as_text(example.get('sample_token', b'?'))}: "
                     f"{len(images)} camera image(s), the model takes {num_cameras} "
                     f"(model.num_cameras); build nuScenes-Drive's six_cam config "
                     f"(config.data.nuscenes_config='six_cam')")
  return images[:num_cameras]


def resized_views(example, features: Features, rng=None) -> list:
  """[(uint8 [S, S, 3] view, (transform, width, height))] of the example's cameras, resized
  (randomly when `rng` is given and the mode crops), or the ones `cache` stored."""
  if "resized_views" in example:
    return example["resized_views"]
  out = []
  for image in camera_images(example, features.num_cameras):
    height, width = image.shape[:2]
    image, transform = preprocess.resize(image, features.image_size, features.resize, rng)
    out.append((image, (transform, width, height)))
  return out


def cache(example, features: Features) -> dict:
  """The example with its views resized once (`resized_views`) and the encoded originals
  dropped: what `Features.cache_examples` keeps in memory. Only for a deterministic resize."""
  views = resized_views(example, features)
  return {**{k: v for k, v in example.items() if k not in ("image", "images")},
          "resized_views": views}


def model_images(example, features: Features, rng=None):
  """The example's camera images as the model takes them: resized (randomly when `rng` is
  given, else deterministically), augmented when `rng` is given and `features.augment`, and
  normalised: [S, S, 3], or [V, S, S, 3] for V = `features.num_cameras` > 1. Also returns
  each view's (transform, width, height) for its boxes."""
  f = features
  frames, transforms = [], []
  for image, transform in resized_views(example, f, rng):
    if rng is not None and f.augment:
      image = preprocess.augment(image, rng)
    frames.append(preprocess.normalize(image, f.statistics))
    transforms.append(transform)
  return (frames[0] if f.num_cameras == 1 else np.stack(frames)), transforms


class ExampleTransform:
  """One tfds example -> fixed-shape numpy features (labels zeroed when not `labelled`)."""

  def __init__(self, features: Features, domain: int, labelled: bool, train: bool, seed: int):
    self.f, self.domain, self.labelled, self.train, self.seed = (features, domain, labelled,
                                                                 train, seed)
    self.tokenizer = tokenizer_lib.load(features.tokenizer)
    self.captions = None
    if features.caption_tokenizer:
      import transformers
      self.captions = transformers.AutoTokenizer.from_pretrained(features.caption_tokenizer,
                                                                 local_files_only=True)

  def __call__(self, index, example):
    f = self.f
    rng = np.random.default_rng([self.seed, self.domain, index])
    image, transforms = model_images(example, f, rng if self.train else None)
    # Each view's boxes (nuScenes-Drive: `box_camera` says whose), the cameras taking turns
    # (each camera's first box, then each one's second, ...), so that `max_boxes` slots are
    # shared by every view rather than filled by the first cameras.
    cameras = example.get("box_camera", np.zeros(len(example["boxes"]), np.int32))
    boxes, box_camera, categories, turn = [], [], [], []
    for c, (transform, width, height) in enumerate(transforms):
      mine = cameras == c
      b, keep = preprocess.transform_boxes(example["boxes"][mine], width, height, transform,
                                           f.image_size)
      boxes.append(b[keep])
      categories.append(example["box_categories"][mine][keep])
      box_camera.append(np.full(int(keep.sum()), c, np.int32))
      turn.append(np.arange(int(keep.sum())))
    order = np.argsort(np.concatenate(turn), kind="stable")[:f.max_boxes]
    boxes = np.concatenate(boxes)[order]
    categories = np.concatenate(categories)[order]
    box_camera = np.concatenate(box_camera)[order]
    n = len(boxes)

    actions = np.asarray(example["actions"], np.float32)
    has_reasons = "reasons" in example
    reasons = np.asarray(example["reasons"], np.float32) if has_reasons else np.zeros(21,
                                                                                     np.float32)
    has_actions = bool(example.get("has_actions", True))
    pairs = qa_pairs(example, f.drivelm_questions)
    if pairs:
      instruction, answer = pairs[int(rng.integers(len(pairs)))]
    else:   # the explanation of the labels; none for a frame without actions (no answer)
      instruction = as_text(example.get("instruction", b"")) or DEFAULT_INSTRUCTION
      answer = (labels.explanation(actions.astype(int), reasons.astype(int)) if has_actions
                else "")
    # Unlabelled target rows: the answer (an explanation, i.e. a label) leaves the LM input
    # too, prompt only; so do rows with no answer to learn.
    answer = answer if self.labelled else ""
    try:
      text = self.tokenizer.sequence(instruction, answer, f.num_image_tokens, f.max_len)
    except ValueError as e:
      name = as_text(example.get("sample_token", example.get("file_name", b"?")))
      raise ValueError(f"example {name}, question {instruction[:80]!r}...: {e} "
                       f"(raise config.data.max_len)") from e
    encoded = self.tokenizer.encode(instruction)
    instruction_ids = encoded[:f.max_instruction_len]
    text["instruction_ids"] = np.full(f.max_instruction_len, self.tokenizer.pad_id, np.int32)
    text["instruction_ids"][:len(instruction_ids)] = instruction_ids
    text["instruction_mask"] = (np.arange(f.max_instruction_len)
                                < len(instruction_ids)).astype(np.int32)

    # Caption for contrastive image-text fine-tuning: the instruction, on every row. Not the
    # answer on labelled rows: captions of another form on source than on target rows would
    # teach the tower to tell the domains apart (measured: teachers warm-started from such a
    # stage adapted to 42-56 target mAP, from scratch 74).
    if self.captions is not None:   # the CLIP tokenizer's own <bos> ... <eos>
      caption = self.captions(instruction, truncation=True,
                              max_length=f.max_caption_len)["input_ids"]
      pad = self.captions.pad_token_id if self.captions.pad_token_id is not None else 0
    else:
      caption = encoded[:f.max_caption_len - 1] + [self.tokenizer.eos_id]
      pad = self.tokenizer.pad_id
    text["caption_ids"] = np.full(f.max_caption_len, pad, np.int32)
    text["caption_ids"][:len(caption)] = caption
    text["caption_mask"] = (np.arange(f.max_caption_len) < len(caption)).astype(np.int32)

    out = {
        "image": image, **text,
        "actions": actions, "reasons": reasons,
        # nuScenes-Drive keeps frames DriveLM asks about without their actions.
        "action_mask": np.float32(has_actions),
        "reason_mask": np.float32(has_reasons),
        "boxes": np.zeros((f.max_boxes, 4), np.float32),
        "box_mask": (np.arange(f.max_boxes) < n).astype(np.float32),
        "box_categories": np.zeros(f.max_boxes, np.int32),
        "box_camera": np.zeros(f.max_boxes, np.int32),
        "domain": np.int32(self.domain), "example_id": example["example_id"],
    }
    out["boxes"][:n], out["box_categories"][:n], out["box_camera"][:n] = (boxes, categories,
                                                                         box_camera)
    if not self.labelled:   # unlabelled target: nothing a loss could learn from
      out.update(actions=np.zeros_like(actions), reasons=np.zeros_like(reasons),
                 action_mask=np.float32(0), reason_mask=np.float32(0))
    if not answer:
      out.update(targets=np.full_like(text["targets"], self.tokenizer.pad_id),
                 loss_mask=np.zeros_like(text["loss_mask"]))
    return out


# Decoded, resized examples (`cache`) by dataset and resize, shared by every pipeline of this
# process that reads them: the runs of one process (the demo's, a sweep's) and each of their
# evaluation passes decode a frame once. Keyed by the dataset's files too (dataset_info.json's
# modification time), so a dataset rebuilt in place is read afresh.
_DECODED: dict = {}


def _decoded(spec: SourceSpec, source, features: Features) -> dict:
  info = epath.Path(source.dataset_info.data_dir) / "dataset_info.json"
  key = (spec, info.stat().mtime, features.image_size, features.resize, features.num_cameras)
  return _DECODED.setdefault(key, {})


def _branch(spec, features, rows, domain, labelled, train, seed, shard_index, shard_count):
  """One domain's part of host `shard_index`'s batches, `rows` examples each.

  The global batches (`rows * shard_count` examples of one stream, shuffled and repeated
  when training) are the same for any number of hosts; host h takes rows [h * rows,
  (h + 1) * rows) of each, and an example's augmentation follows its position in the global
  stream. So a run on several hosts sees the batches of a run on one."""
  source, indices = open_source(spec)
  total = rows * shard_count
  if train and len(indices) < total:
    raise ValueError(f"{spec.name} {spec.split}: {len(indices)} examples, fewer than a global "
                     f"batch of {total} ({rows} per host x {shard_count})")
  order = grain.MapDataset.range(len(indices))
  if train:
    order = order.shuffle(seed=seed + 7919 * domain).repeat()
  full, rest = divmod(len(order), total)
  length = full * rows + min(rows, max(0, rest - shard_index * rows))
  transform = ExampleTransform(features, domain, labelled, train, seed)
  cached = (_decoded(spec, source, features)
            if features.cache_examples and (features.resize == "pad" or not train) else None)

  def example(q):   # this host's q-th example, at position p of the global stream
    p = (q // rows) * total + shard_index * rows + q % rows
    i = int(indices[order[p]])
    if cached is not None and i in cached:
      return transform(p, cached[i])
    decoded = {**source[i], "example_id": np.int64(i)}
    if cached is not None and len(cached) < features.cache_examples:
      decoded = cached[i] = cache(decoded, features)
    return transform(p, decoded)

  return grain.MapDataset.range(length).map(example).batch(rows, drop_remainder=train)


def _concat(*batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def target_rows(batch_size: int, hosts: int, target_fraction: float) -> int:
  """This host's target rows: round(global batch * target_fraction) split evenly over the
  hosts, so that every host count gives the same global batches."""
  if not 0 <= target_fraction < 1:
    raise ValueError(f"target_fraction {target_fraction}: must be in [0, 1) (source rows carry "
                     f"the labels)")
  total = batch_size * hosts
  rows = int(round(total * target_fraction))
  if rows == total:
    raise ValueError(f"target_fraction {target_fraction} of a batch of {total} rounds to "
                     f"{rows} target rows, no source row: lower the fraction")
  if target_fraction > 0 and rows == 0:
    raise ValueError(f"target_fraction {target_fraction} of a batch of {total} rounds to no "
                     f"target row: raise the batch size or the fraction (or set it to 0)")
  if rows % hosts:
    raise ValueError(f"target_fraction {target_fraction} of a batch of {total} is {rows} "
                     f"target rows, which {hosts} hosts cannot share evenly: choose a batch "
                     f"size and fraction whose target rows are a multiple of {hosts}")
  return rows // hosts


# Threads preparing batches in a process (`batches`; config.data.read_threads). One: the
# transforms are Python and hold the GIL, so more threads contend for it instead of running
# in parallel (processes do: `workers`), and each costs CPU the training step needs. The
# demo's batches on a 2-core Xeon, 1 / 2 / 16 threads: 2494 / 1577 / 1173 examples/s at 6.5 /
# 12.2 / 16.6 ms of CPU a batch; at 224 px 776 / 780 / 592 at 20.7 / 27.7 / 35.9 ms; the
# demo's trainer at 0.82 of its bare step's examples/s with 1, 0.80 with 16 (3 runs each,
# alternated; 2026-12-05). More pay off only where reading waits (a dataset in a bucket, in
# the first epoch, before the decoded frames are cached).
READ_THREADS = 1


def batch_dataset(source: SourceSpec, features: Features, batch_size: int, *, target=None,
                  target_fraction=0.5, target_labelled=False, train=True, seed=0,
                  shard_index=None, shard_count=None) -> grain.MapDataset:
  """Random-access per-host batches: `ds[step]` is the batch of that step (dicts of numpy
  arrays, leading dim `batch_size`). Infinite when training; one pass otherwise (the last
  batch may be short). `target_labelled` keeps target labels (the oracle). `example_id` is
  each example's index in its tfds split."""
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard {shard_index} of {shard_count}: the index must be in "
                     f"[0, {shard_count})")
  if batch_size < 1:
    raise ValueError(f"batch size {batch_size} per host: at least 1")
  n_target = target_rows(batch_size, shard_count, target_fraction) if target is not None else 0
  common = dict(train=train, seed=seed, shard_index=shard_index, shard_count=shard_count)
  parts = [_branch(source, features, batch_size - n_target, 0, True, **common)]
  if n_target:
    parts.append(_branch(target, features, n_target, 1, target_labelled, **common))
  length = min(len(p) for p in parts) if not train else sys.maxsize
  return grain.MapDataset.range(length).map(lambda i: _concat(*(p[i] for p in parts)))


def batches(*args, start: int = 0, workers: int = 0, read_ahead: int = 16,
            threads: int = READ_THREADS, **kwargs) -> grain.IterDataset:
  """`batch_dataset(*args, **kwargs)` from batch `start` on, as an iterable: up to
  `read_ahead` batches are prepared ahead, by `threads` threads (at most `read_ahead`), in
  each of `workers` grain processes (0: in this process). Bounded, unlike grain's default of
  500: a run's last batches read ahead are work thrown away, taken from the step's cores."""
  if threads < 1:
    raise ValueError(f"threads {threads}: at least 1 (config.data.read_threads)")
  ds = batch_dataset(*args, **kwargs)
  options = grain.ReadOptions(num_threads=min(threads, read_ahead),
                             prefetch_buffer_size=read_ahead)
  ds = (ds[start:] if start else ds).to_iter_dataset(options)
  if workers:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags; outside absl.app
      flags.FLAGS.mark_as_parsed()    # (tests, notebooks) take their defaults
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds
