"""Writes the BDD-OIA `lastframe` layout: `lastframe/data/<name>.jpg` and, per split,
`<split>_25k_images_actions.json` + `<split>_25k_images_reasons.json`.

Like the released archive, the action annotations carry no id: the list is indexed by the
image's id (`annotations[image["id"]]`), ids do not follow the image order, a few action rows
carry a 5th value of 1 ("confusing"), and the reasons file lists images in another order.
Sim-only extras that the real archive lacks (2D boxes, instructions, QA, domain) go to
`sim_<split>_extras.json`.
"""
import io
import json
import os

import numpy as np

from drivlm_jax.sim import domains, labels, render, scene as scene_lib

CONFUSING_EVERY = 50   # like the released archive, about 2% of rows are "confusing"
_CAMERA_HEIGHT = 1.5


def frame(seed: int, index: int, domain: domains.Domain, width: int, height: int):
  """One front-camera frame. The scene (and so every label) depends on (seed, index) only;
  the domain changes pixels only. Returns (jpeg bytes, record dict)."""
  graph_rng = np.random.default_rng([seed, index, 0])
  scene = scene_lib.sample_scene(graph_rng)
  actions, reasons = labels.actions_and_reasons(scene)
  instruction = labels.instruction(graph_rng, scene)
  ground, cuboids, lamps = render.world(scene, np.random.default_rng([seed, index, 1]))
  pinhole = render.Pinhole(width, height, domain.camera_variant.fov_deg)
  look_rng = np.random.default_rng([seed, index, 2, *domain.name.encode()])
  image, boxes = render.render(ground, cuboids, lamps, pinhole, render.camera_to_ego_rotation(0.0),
                               np.array([0.0, 0.0, _CAMERA_HEIGHT]), domain, look_rng)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  record = {"actions": actions.tolist(), "reasons": reasons.tolist(),
            "instruction": instruction, "explanation": labels.explanation(actions, reasons),
            "qa": labels.qa_pairs(scene, actions, reasons),
            "boxes": [{"category": c, "box": b} for _, c, b in boxes]}
  return buffer.getvalue(), record


def write(out: str, domain_name: str, num: int, seed: int, split: str = "train",
          width: int | None = None, height: int | None = None, progress=None) -> dict:
  """Writes `num` frames of one split; returns counts. Image names carry seed and domain, so
  several domains and splits can share one `lastframe/data/`."""
  domain = domains.parse_domain(domain_name)
  width = width or domain.camera_variant.width
  height = height or domain.camera_variant.height
  data_dir = os.path.join(out, "lastframe", "data")
  os.makedirs(data_dir, exist_ok=True)
  root = os.path.join(out, "lastframe")
  actions_path = os.path.join(root, f"{split}_25k_images_actions.json")
  old = _read_json(actions_path, {"images": [], "annotations": []})
  images, annotations, reasons, extras = old["images"], old["annotations"], [], {}
  confusing = 0
  rng = np.random.default_rng([seed, 999])
  # Image ids are positions in the annotations list (after those of earlier domains), in
  # an order of their own.
  ids = len(annotations) + np.random.default_rng([seed, 998]).permutation(num)
  annotations.extend([None] * num)
  for i in (progress or (lambda x: x))(range(num)):
    name = f"sim_{domain_name.replace('+', '-')}_{split}_{seed}_{i:06d}.jpg"
    jpeg, record = frame(seed, i, domain, width, height)
    with open(os.path.join(data_dir, name), "wb") as f:
      f.write(jpeg)
    category = list(record["actions"])
    if i % CONFUSING_EVERY == CONFUSING_EVERY // 2:
      category.append(1)
      confusing += 1
    images.append({"file_name": name, "id": int(ids[i]), "height": height, "width": width})
    annotations[ids[i]] = {"category": category}
    reasons.append({"file_name": name, "reason": record["reasons"]})
    extras[name] = {"domain": domain_name, **{k: record[k] for k in
                                              ("instruction", "explanation", "qa", "boxes")}}
  rng.shuffle(reasons)
  # Several domains may write one split: each call appends to what is there.
  reasons_path = os.path.join(root, f"{split}_25k_images_reasons.json")
  extras_path = os.path.join(root, f"sim_{split}_extras.json")
  _write_json(actions_path, {"images": images, "annotations": annotations})
  _write_json(reasons_path, _read_json(reasons_path, []) + reasons)
  _write_json(extras_path, {**_read_json(extras_path, {}), **extras})
  return {"images": num, "confusing": confusing, "width": width, "height": height}


def _read_json(path, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f)
