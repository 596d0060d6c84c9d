"""The input pipeline: mixing, label masking, determinism, host sharding, tokenization."""
import dataclasses
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageEnhance

from configs import common
from data_builders import __main__ as build_cli
from drivlm_jax.data import labels, pipeline, preprocess
from drivlm_jax.data.tokenizer import TextTokenizer
from drivlm_jax.losses import task
from drivlm_jax import hf
from drivlm_jax.model import vision, vlm
from drivlm_jax.sim import bdd_oia as sim_bdd
from drivlm_jax.sim import nuscenes as sim_nuscenes
from drivlm_jax.sim import tokenizer as sim_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  manual = str(tmp_path_factory.mktemp("bdd"))
  sim_bdd.write(manual, "day", 40, seed=0, width=160, height=90)
  nus = str(tmp_path_factory.mktemp("nus"))
  sim_nuscenes.write(nus, "night", 2, seed=0, width=160, height=90)
  sim_nuscenes.write(nus, "day", 2, seed=1, width=160, height=90, location="singapore-onenorth")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  build_cli.build("bdd_oia", manual, data_dir)
  build_cli.build("nuscenes_drive", nus, data_dir, config="front")
  features = pipeline.Features(tokenizer=sim_tokenizer.write(manual), image_size=64,
                               num_image_tokens=64, max_len=160)
  return {"source": pipeline.SourceSpec("bdd_oia", data_dir),
          "target": pipeline.SourceSpec("nuscenes_drive/front", data_dir,
                                        where=(("night", True),)),
          "features": features, "data_dir": data_dir}


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_batches_mix_source_and_masked_target(data):
  (batch,) = _take(pipeline.batches(data["source"], data["features"], 8,
                                    target=data["target"], target_fraction=0.25), 1)
  np.testing.assert_array_equal(batch["domain"], [0] * 6 + [1] * 2)
  assert batch["image"].shape == (8, 64, 64, 3) and batch["input_ids"].shape == (8, 160)
  target = batch["domain"] == 1
  assert (batch["action_mask"][target] == 0).all() and (batch["actions"][target] == 0).all()
  assert (batch["loss_mask"][target] == 0).all() and (batch["reason_mask"][target] == 0).all()
  assert (batch["action_mask"][~target] == 1).all() and batch["loss_mask"][~target].sum() > 0
  # The answer (a label) is not in an unlabelled row's LM input: it ends with the prompt,
  # i.e. the instruction tokens after the image placeholders.
  tok = TextTokenizer(data["features"].tokenizer)
  for row in np.flatnonzero(target):
    ids = batch["input_ids"][row][batch["attention_mask"][row] > 0]
    n_image = data["features"].num_image_tokens
    assert ids[0] == tok.bos_id and (ids[1:1 + n_image] == tok.image_id).all()
    # instruction_ids: the instruction's first max_instruction_len tokens
    instruction = batch["instruction_ids"][row][batch["instruction_mask"][row] > 0]
    assert len(instruction) == min(len(ids) - 1 - n_image,
                                   data["features"].max_instruction_len)
    np.testing.assert_array_equal(ids[1 + n_image:1 + n_image + len(instruction)], instruction)
  # Captions (CLIP fine-tuning) have one form on every row, so they cannot tell the domain:
  # the instruction (its first max_caption_len - 1 tokens) and <eos>.
  for row in range(len(batch["domain"])):
    caption = batch["caption_ids"][row][batch["caption_mask"][row] > 0]
    instruction = batch["instruction_ids"][row][batch["instruction_mask"][row] > 0]
    n = min(len(caption) - 1, len(instruction))
    assert caption[-1] == tok.eos_id and n == len(instruction)
    np.testing.assert_array_equal(caption[:n], instruction)
  # The night filter holds: every target example comes from a night scene.
  import tensorflow_datasets as tfds
  source = tfds.data_source("nuscenes_drive/front", data_dir=data["data_dir"], split="train")
  assert all(source[int(i)]["night"] for i in batch["example_id"][target])


def test_target_labels_never_reach_the_gradient(data):
  cfg = vlm.config_from_dict(common.model_config("tiny"))
  params = vlm.init(cfg, jax.random.key(0))
  (batch,) = _take(pipeline.batches(data["source"], data["features"], 4,
                                    target=data["target"], target_fraction=0.5), 1)

  def grads(b):
    def loss(p):
      out = vlm.apply(cfg, p, b["image"], b["input_ids"], b["attention_mask"])
      return sum(task.task_losses(out, b).values())
    return jax.grad(loss)(params)

  def relabel(rows):
    b = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(1)
    b["actions"][rows] = rng.integers(0, 2, b["actions"][rows].shape)
    b["reasons"][rows] = rng.integers(0, 2, b["reasons"][rows].shape)
    b["targets"][rows] = rng.integers(0, 500, b["targets"][rows].shape)
    return b

  base = grads(batch)
  same = grads(relabel(batch["domain"] == 1))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
  changed = grads(relabel(batch["domain"] == 0))   # the check can fail: source labels count
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base),
                                                      jax.tree.leaves(changed)))


def test_deterministic_for_a_seed_workers_and_threads(data):
  make = lambda seed, workers=0, threads=1: pipeline.batches(
      data["source"], data["features"], 4, target=data["target"], seed=seed, workers=workers,
      threads=threads)
  a, b, c = _take(make(3), 3), _take(make(3), 3), _take(make(4), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  for x, y in zip(a, _take(make(3, workers=2), 3)):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["example_id"], y["example_id"])
  for x, y in zip(a, _take(make(3, threads=4), 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  with pytest.raises(ValueError, match="read_threads"):
    make(3, threads=0)


def test_cached_frames_give_the_same_batches(data):
  """Features.cache_examples keeps decoded, resized frames (some, up to its bound): the
  batches, augmented, with boxes and the nuScenes target, are those of no cache."""
  cached = dataclasses.replace(data["features"], cache_examples=7)
  make = lambda f: pipeline.batch_dataset(data["source"], f, 8, target=data["target"],
                                          seed=2)
  plain, with_cache = make(data["features"]), make(cached)
  for step in (0, 1, 5, 0, 9, 5):   # revisits: cached examples come back
    a, b = plain[step], with_cache[step]
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("count", [2, 3])
def test_hosts_read_disjoint_shards(data, count):
  seen = []
  for index in range(count):
    ids = np.concatenate([b["example_id"] for b in pipeline.batches(
        data["source"], data["features"], 4, train=False, shard_index=index,
        shard_count=count)])
    seen.append(set(ids.tolist()))
  assert all(not (seen[i] & seen[j]) for i in range(count) for j in range(i + 1, count))
  assert set().union(*seen) == set(range(39))   # 40 written, 1 "confusing" row dropped


@pytest.mark.parametrize("batch,fraction,hosts", [(8, 0.25, 2), (12, 0.5, 3), (6, 1 / 3, 2)])
def test_any_host_count_trains_on_the_global_batches_of_one(data, batch, fraction, hosts):
  """Each step, the hosts' batches together are the one-host batch: the same examples, as
  many target rows (round(global batch * fraction), split evenly), the same images."""
  def rows(count, index, step):
    ds = pipeline.batch_dataset(data["source"], data["features"], batch // count,
                                target=data["source"], target_fraction=fraction, seed=3,
                                shard_index=index, shard_count=count)
    b = ds[step]
    return sorted(zip(b["domain"].tolist(), b["example_id"].tolist(),
                      b["image"].reshape(len(b["image"]), -1).sum(1).round(3).tolist()))
  for step in (0, 5):   # 5: past the first epoch of 39 examples at batch 12
    one = rows(1, 0, step)
    assert sum(d for d, _, _ in one) == round(batch * fraction)
    assert sorted(sum((rows(hosts, h, step) for h in range(hosts)), [])) == one


@pytest.mark.parametrize("batch,fraction,hosts,message", [
    (8, 0.25, 4, r"2 target rows, which 4 hosts cannot share"),    # each host's 0.5 -> 0
    (12, 0.25, 2, r"3 target rows, which 2 hosts cannot share"),   # 1.5 -> 2 each: 4, not 3
    (4, 0.1, 1, r"rounds to no target row"),
    (4, 1.0, 1, r"target_fraction 1.0: must be in \[0, 1\)"),
    (2, 0.75, 1, r"no source row"),
])
def test_a_batch_the_hosts_cannot_share_is_an_error(data, batch, fraction, hosts, message):
  """Target rows the hosts cannot split evenly (rounding each host's share gave another
  global batch than one host's), none where a fraction was asked for, or no source row."""
  with pytest.raises(ValueError, match=message):
    pipeline.batch_dataset(data["source"], data["features"], batch // hosts,
                           target=data["source"], target_fraction=fraction, shard_count=hosts,
                           shard_index=0)


def test_tokenized_answer_round_trips(data):
  tok = TextTokenizer(data["features"].tokenizer)
  answer = labels.explanation([1, 0, 1, 0], [0, 0, 1] + [0] * 18)
  seq = tok.sequence("Is it safe to turn left?", answer, num_image_tokens=64, max_len=160)
  assert (seq["input_ids"][1:65] == tok.image_id).sum() == 64
  assert tok.decode(seq["targets"][seq["loss_mask"] > 0]) == answer
  n = seq["attention_mask"].sum()
  np.testing.assert_array_equal(seq["input_ids"][1:n], seq["targets"][:n - 1])
  assert seq["targets"][n - 1] == tok.eos_id and (seq["input_ids"][n:] == tok.pad_id).all()


def test_a_kept_sequence_is_the_one_tokenized_afresh(data):
  kept, fresh = (TextTokenizer(data["features"].tokenizer) for _ in range(2))
  answer = labels.explanation([0, 1, 0, 0], [1] + [0] * 20)
  first = kept.sequence("Go?", answer, num_image_tokens=8, max_len=64)
  again = kept.sequence("Go?", answer, num_image_tokens=8, max_len=64)
  want = fresh._sequence("Go?", answer, 8, 64)   # pylint: disable=protected-access
  assert first is not again and first.keys() == again.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(again[k], want[k])
    with pytest.raises(ValueError, match="read-only"):   # shared: no caller may write it
      again[k][0] = 1
  other = kept.sequence("Go?", answer, num_image_tokens=8, max_len=72)
  assert other["input_ids"].shape == (72,)


def test_normalize_matches_the_hf_processors_for_every_pixel_value(tmp_path):
  """The families' statistics, and a checkpoint's own as `hf.processor_statistics` reads
  them from the processor transformers saved beside it (one number for every channel too)."""
  import transformers   # pylint: disable=import-outside-toplevel
  values = np.arange(256, dtype=np.uint8).reshape(16, 16)
  image = np.stack([values, values.T, values[::-1]], -1)   # every value in every channel
  own = transformers.CLIPImageProcessor(image_mean=[0.2, 0.5, 0.7], image_std=0.3)
  own.save_pretrained(tmp_path)
  for family, processor in (("clip", transformers.CLIPImageProcessor()),
                            ("siglip", transformers.SiglipImageProcessor()), ("clip", own)):
    want = processor(images=image, do_resize=False, do_center_crop=False,
                     return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    cfg = vision.Config(family=family,
                        **(hf.processor_statistics(tmp_path) if processor is own else {}))
    got = preprocess.normalize(image, preprocess.statistics(cfg))
    assert got.dtype == np.float32 and got.shape == image.shape
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    views = np.stack([image, image[::-1]])   # several cameras: [V, S, S, 3]
    np.testing.assert_array_equal(
        preprocess.normalize(views, preprocess.statistics(cfg))[1], got[::-1])


def test_a_processor_is_read_where_transformers_reads_it_and_a_bad_one_is_named(tmp_path):
  """processor_config.json's nested image processor before preprocessor_config.json, as
  transformers 5 loads them; values no normalisation can use are errors naming the file."""
  import transformers   # pylint: disable=import-outside-toplevel
  transformers.CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3]).save_pretrained(tmp_path)
  nested = {"image_processor": {"image_mean": [0.4], "image_std": [0.2, 0.3, 0.4],
                                "image_processor_type": "CLIPImageProcessor"},
            "processor_class": "LlavaProcessor"}
  (tmp_path / hf.PROCESSOR).write_text(json.dumps(nested))
  theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
  assert list(theirs.image_mean) == [0.4] and list(theirs.image_std) == [0.2, 0.3, 0.4]
  assert hf.processor_statistics(tmp_path) == {"image_mean": (0.4, 0.4, 0.4),
                                               "image_std": (0.2, 0.3, 0.4)}
  for bad, message in (({"image_mean": [0.1, 0.2]}, r"image_mean \[0.1, 0.2\] is not one "),
                       ({"image_std": [0.5, 0.0, 0.5]}, r"image_std .* must be positive"),
                       ({"rescale_factor": None}, r"rescales pixels by None"),
                       ({"rescale_factor": 1.0}, r"rescales pixels by 1.0, not 1/255")):
    (tmp_path / hf.PROCESSOR).write_text(json.dumps({"image_processor": bad}))
    with pytest.raises(hf.CheckpointError, match=rf"{hf.PROCESSOR}: .*{message}"):
      hf.processor_statistics(tmp_path)


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_resize_keeps_boxes_on_their_pixels(mode):
  image = Image.new("RGB", (320, 180))
  ImageDraw.Draw(image).rectangle([100, 40, 179, 119], fill=(255, 255, 255))
  box = np.array([[100 / 320, 40 / 180, 180 / 320, 120 / 180]])
  out, transform = preprocess.resize(np.asarray(image), 96, mode)
  moved, keep = preprocess.transform_boxes(box, 320, 180, transform, 96)
  assert keep.all()
  x1, y1, x2, y2 = np.round(moved[0] * 96).astype(int)
  white = out[..., 0] > 128
  assert white[y1 + 1:y2 - 1, x1 + 1:x2 - 1].all()
  assert white.sum() <= (x2 - x1 + 2) * (y2 - y1 + 2)


def test_a_prompt_longer_than_max_len_names_its_example(data):
  source = tfds.data_source("nuscenes_drive/front", data_dir=data["data_dir"], split="train")
  example = source[0]
  short = dataclasses.replace(data["features"], max_len=data["features"].num_image_tokens + 4)
  transform = pipeline.ExampleTransform(short, 0, labelled=True, train=True, seed=0)
  with pytest.raises(ValueError, match=rf"example {example['sample_token'].decode()}, "
                                       r"question .*config.data.max_len"):
    transform(0, example)


def test_augment_is_pillows_image_enhance():
  """`preprocess.augment` against Pillow's ImageEnhance Brightness, Contrast and Color (its
  reference), the same factors drawn: the same bits, on random, smooth and flat frames of
  any size up to 1080p, with factors at and past 1 (the clipping branch); a batch of frames
  is an error, not one contrast mean over all of them."""
  def pillow(image, rng):
    pil = Image.fromarray(image)
    pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(0.75, 1.25))
    pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(0.75, 1.25))
    pil = ImageEnhance.Color(pil).enhance(rng.uniform(0.8, 1.2))
    return np.asarray(pil)

  rng = np.random.default_rng(0)
  for i in range(600):
    h, w = (int(n) for n in rng.integers(1, 90, 2))
    image = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
             np.clip(rng.normal(128, 70, (h, w, 3)), 0, 255).astype(np.uint8),
             np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)][i % 3]
    seed = int(rng.integers(1 << 30))
    ours = preprocess.augment(image, np.random.default_rng(seed))
    assert ours.dtype == np.uint8 and ours.shape == image.shape
    np.testing.assert_array_equal(ours, pillow(image, np.random.default_rng(seed)),
                                  err_msg=f"frame {i}")
  # Frames past 2^16 pixels: the mean's sum would no longer be exact in float32.
  for shape in ((384, 384, 3), (1080, 1920, 3)):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(preprocess.augment(image, np.random.default_rng(5)),
                                  pillow(image, np.random.default_rng(5)), err_msg=str(shape))
  with pytest.raises(ValueError, match="uint8 RGB frame"):
    preprocess.augment(np.zeros((2, 8, 8, 3), np.uint8), rng)
