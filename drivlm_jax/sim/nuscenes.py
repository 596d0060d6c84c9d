"""Writes the nuScenes layout: `v1.0-mini/*.json` tables, `samples/CAM_*/*.jpg` from six
cameras, `maps/*.png`, a DriveLM-format QA file `v1_1_<split>_nus.json` and `splits.json`.

Each scene is one ego manoeuvre (forward, stop, left, right) over KEYFRAMES keyframes at
2 Hz; the scene graph is sampled to fit it (a stop has a red light or a stopped car ahead),
and the ego path agrees with the label the DESIGN rule derives from it.
"""
import hashlib
import json
import os

import numpy as np
from PIL import Image

from drivlm_jax.data.labels import KEYFRAME_HZ
from drivlm_jax.sim import domains, drivelm as drivelm_qa, labels, render, scene as scene_lib

VERSION = "v1.0-mini"
KEYFRAMES = 16
# channel: (x, y, z) in the ego frame, yaw (deg) left of forward.
CAMERAS = {
    "CAM_FRONT": ((1.70, 0.00, 1.51), 0.0), "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.51), -55.0),
    "CAM_BACK_RIGHT": ((1.04, -0.48, 1.56), -110.0), "CAM_BACK": ((0.03, 0.00, 1.57), 180.0),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0), "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0)}
MANEUVERS = {  # speed (m/s) at t, yaw rate (rad/s)
    "forward": (lambda t: 8.0, 0.0), "stop": (lambda t: max(0.0, 8.0 - 4.0 * t), 0.0),
    "left": (lambda t: 5.0, 0.25), "right": (lambda t: 5.0, -0.25)}
_NUSC_CATEGORY = {"car": "vehicle.car", "pedestrian": "human.pedestrian.adult",
                  "rider": "vehicle.bicycle", "obstacle": "movable_object.trafficcone"}
_ATTRIBUTES = ("vehicle.moving", "vehicle.stopped", "pedestrian.standing", "cycle.with_rider")
_TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
           "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map")


def token(*parts) -> str:
  return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def quaternion_from_matrix(m) -> list:
  """3x3 rotation -> [w, x, y, z] (nuScenes order), w >= 0."""
  m = np.asarray(m, np.float64)
  w = np.sqrt(max(0.0, 1 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
  x = np.sqrt(max(0.0, 1 + m[0, 0] - m[1, 1] - m[2, 2])) / 2
  y = np.sqrt(max(0.0, 1 - m[0, 0] + m[1, 1] - m[2, 2])) / 2
  z = np.sqrt(max(0.0, 1 - m[0, 0] - m[1, 1] + m[2, 2])) / 2
  x = np.copysign(x, m[2, 1] - m[1, 2])
  y = np.copysign(y, m[0, 2] - m[2, 0])
  z = np.copysign(z, m[1, 0] - m[0, 1])
  q = np.array([w, x, y, z])
  return (q / np.linalg.norm(q)).tolist()


def ego_path(maneuver: str, x0, y0, yaw0, steps=KEYFRAMES, substeps=20):
  """Keyframe poses [(x, y, yaw)] of a manoeuvre, integrated at 40 Hz."""
  speed, yaw_rate = MANEUVERS[maneuver]
  dt = 1 / KEYFRAME_HZ / substeps
  x, y, yaw, t, poses = x0, y0, yaw0, 0.0, []
  for _ in range(steps):
    poses.append((x, y, yaw))
    for _ in range(substeps):
      v = speed(t)
      x, y = x + v * np.cos(yaw) * dt, y + v * np.sin(yaw) * dt
      yaw += yaw_rate * dt if v > 0 else 0.0
      t += dt
  return poses


class _Tables:
  """The 13 tables, appended to those already in `root` (several runs share one dataroot)."""

  def __init__(self, root):
    self.root = os.path.join(root, VERSION)
    os.makedirs(self.root, exist_ok=True)
    self.rows = {}
    for name in _TABLES:
      path = os.path.join(self.root, f"{name}.json")
      self.rows[name] = json.load(open(path)) if os.path.exists(path) else []
    self.tokens = {name: {r["token"] for r in rows} for name, rows in self.rows.items()}

  def add(self, name, row):
    if row["token"] not in self.tokens[name]:
      self.tokens[name].add(row["token"])
      self.rows[name].append(row)
    return row["token"]

  def save(self):
    for name, rows in self.rows.items():
      with open(os.path.join(self.root, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=0)


def _static_tables(t: _Tables, width, height, fov):
  for name in _NUSC_CATEGORY.values():
    t.add("category", {"token": token("category", name), "name": name, "description": name})
  for name in _ATTRIBUTES:
    t.add("attribute", {"token": token("attribute", name), "name": name, "description": name})
  for level, (lo, hi) in enumerate(((0, 40), (40, 60), (60, 80), (80, 100)), start=1):
    t.add("visibility", {"token": str(level), "level": f"v{lo}-{hi}",
                         "description": f"visibility of whole object is between {lo} and {hi}%"})
  k = render.Pinhole(width, height, fov).intrinsic
  calibrated = {}
  for channel, (xyz, yaw) in CAMERAS.items():
    sensor = t.add("sensor", {"token": token("sensor", channel), "channel": channel,
                              "modality": "camera"})
    rotation = quaternion_from_matrix(render.camera_to_ego_rotation(np.radians(yaw)))
    calibrated[channel] = t.add("calibrated_sensor", {
        "token": token("calibrated_sensor", channel, width, height, fov), "sensor_token": sensor,
        "translation": list(xyz), "rotation": rotation, "camera_intrinsic": k.tolist()})
  return calibrated


def write(out: str, domain_name: str, num: int, seed: int, split: str = "train",
          width: int | None = None, height: int | None = None, location: str = "boston-seaport",
          progress=None) -> dict:
  """Writes `num` scenes of KEYFRAMES keyframes x 6 cameras; returns counts."""
  domain = domains.parse_domain(domain_name)
  variant = domain.camera_variant
  width, height = width or variant.width, height or variant.height
  t = _Tables(out)
  calibrated = _static_tables(t, width, height, variant.fov_deg)
  run = (seed, split, domain_name, location)
  log = t.add("log", {"token": token("log", *run), "logfile": f"sim-{seed}-{split}",
                      "vehicle": "sim", "date_captured": "2026-11-24", "location": location})
  map_token = token("map", "sim")
  maps = [m for m in t.rows["map"] if m["token"] == map_token]
  if maps:
    if log not in maps[0]["log_tokens"]:
      maps[0]["log_tokens"].append(log)
  else:
    t.add("map", {"token": map_token, "log_tokens": [log], "category": "semantic_prior",
                  "filename": f"maps/{map_token}.png"})
    os.makedirs(os.path.join(out, "maps"), exist_ok=True)
    Image.new("L", (64, 64), 255).save(os.path.join(out, "maps", f"{map_token}.png"))
  qa_path = os.path.join(out, f"v1_1_{split}_nus.json")
  drivelm = json.load(open(qa_path)) if os.path.exists(qa_path) else {}
  splits_path = os.path.join(out, "splits.json")
  splits = json.load(open(splits_path)) if os.path.exists(splits_path) else {}

  for s in (progress or (lambda x: x))(range(num)):
    rng = np.random.default_rng([seed, s, 0])
    maneuver = str(rng.choice(list(MANEUVERS)))
    graph = scene_lib.sample_scene(rng, require=maneuver)
    actions, reasons = labels.actions_and_reasons(graph)
    x0, y0, yaw0 = rng.uniform(-500, 500), rng.uniform(-500, 500), rng.uniform(-np.pi, np.pi)
    poses = ego_path(maneuver, x0, y0, yaw0)
    road = render.yaw_rotation(yaw0)                     # road frame -> global
    origin = np.array([x0, y0, 0.0])
    ground, cuboids, lamps = render.world(graph, np.random.default_rng([seed, s, 1]))
    agent_cuboids = [c for c in cuboids if c.index >= 0]
    scenery = [c for c in cuboids if c.index < 0]
    name = f"scene-sim-{split}-{seed}-{s:04d}"
    scene_token = token("scene", *run, s)
    sample_tokens = [token("sample", *run, s, i) for i in range(KEYFRAMES)]
    instances = [token("instance", *run, s, a) for a in range(len(agent_cuboids))]
    look_rng = np.random.default_rng([seed, s, 2, *domain_name.encode()])
    qa_frames = {}
    for i, (x, y, yaw) in enumerate(poses):
      stamp = 1_700_000_000_000_000 + (seed % 1000) * 10**9 + s * 10**7 + i * 500_000
      t.add("sample", {"token": sample_tokens[i], "timestamp": stamp, "scene_token": scene_token,
                       "prev": sample_tokens[i - 1] if i else "",
                       "next": sample_tokens[i + 1] if i + 1 < KEYFRAMES else ""})
      moved = []
      for a, c in enumerate(agent_cuboids):
        agent = graph.agents[c.index]
        shift = 6.0 * i / KEYFRAME_HZ if agent.category == "car" and not agent.stopped else 0.0
        moved.append(render.Cuboid(c.category, (c.center[0] + shift, *c.center[1:]), c.size,
                                   c.yaw, c.colour, c.index))
        center = road @ np.asarray(moved[-1].center) + origin
        ann = token("ann", *run, s, i, a)
        attribute = ("vehicle.stopped" if agent.stopped or agent.category != "car" else
                     "vehicle.moving") if agent.category in ("car", "obstacle") else (
                         "cycle.with_rider" if agent.category == "rider" else "pedestrian.standing")
        t.add("sample_annotation", {
            "token": ann, "sample_token": sample_tokens[i], "instance_token": instances[a],
            "visibility_token": "4", "attribute_tokens": [token("attribute", attribute)],
            "translation": center.tolist(), "size": list(c.size),
            "rotation": quaternion_from_matrix(render.yaw_rotation(yaw0 + c.yaw)),
            "prev": token("ann", *run, s, i - 1, a) if i else "",
            "next": token("ann", *run, s, i + 1, a) if i + 1 < KEYFRAMES else "",
            "num_lidar_pts": 10, "num_radar_pts": 0})
      ego_rot = render.yaw_rotation(yaw - yaw0)          # ego -> road frame
      ego_pos = road.T @ (np.array([x, y, 0.0]) - origin)
      image_paths, boxes = {}, {}
      for channel, (xyz, cam_yaw) in CAMERAS.items():
        sd = token("sample_data", *run, s, i, channel)
        pose = t.add("ego_pose", {"token": token("ego_pose", *run, s, i, channel),
                                  "timestamp": stamp, "translation": [x, y, 0.0],
                                  "rotation": quaternion_from_matrix(render.yaw_rotation(yaw))})
        filename = f"samples/{channel}/{name}__{channel}__{stamp}.jpg"
        rotation = ego_rot @ render.camera_to_ego_rotation(np.radians(cam_yaw))
        translation = ego_pos + ego_rot @ np.asarray(xyz)
        image, seen = render.render(ground, scenery + moved, lamps,
                                    render.Pinhole(width, height, variant.fov_deg), rotation,
                                    translation, domain, look_rng)
        for index, _, box in seen:   # each agent's largest 2D box over the cameras
          if min(box[2] - box[0], box[3] - box[1]) < 1:
            continue   # a sliver at an image's edge: no key object anyone can see
          area = (box[2] - box[0]) * (box[3] - box[1])
          if index not in boxes or area > boxes[index][2]:
            boxes[index] = (channel, box, area)
        os.makedirs(os.path.join(out, "samples", channel), exist_ok=True)
        image.save(os.path.join(out, filename), format="JPEG", quality=90)
        image_paths[channel] = filename
        t.add("sample_data", {
            "token": sd, "sample_token": sample_tokens[i], "ego_pose_token": pose,
            "calibrated_sensor_token": calibrated[channel], "timestamp": stamp,
            "fileformat": "jpg", "is_key_frame": True, "height": height, "width": width,
            "filename": filename,
            "prev": token("sample_data", *run, s, i - 1, channel) if i else "",
            "next": token("sample_data", *run, s, i + 1, channel) if i + 1 < KEYFRAMES else ""})
      qa_frames[sample_tokens[i]] = {
          **drivelm_qa.frame(graph, actions, reasons, _DRIVELM_BEHAVIOUR[maneuver],
                             {k: v[:2] for k, v in boxes.items()}),
          "image_paths": image_paths}
    for a in range(len(agent_cuboids)):
      t.add("instance", {"token": instances[a], "category_token": token(
          "category", _NUSC_CATEGORY[agent_cuboids[a].category]), "nbr_annotations": KEYFRAMES,
                         "first_annotation_token": token("ann", *run, s, 0, a),
                         "last_annotation_token": token("ann", *run, s, KEYFRAMES - 1, a)})
    t.add("scene", {"token": scene_token, "log_token": log, "nbr_samples": KEYFRAMES,
                    "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                    "name": name, "description": f"{domain.description}, {_BEHAVIOUR[maneuver]}"})
    drivelm[scene_token] = {"scene_description": domain.description, "key_frames": qa_frames}
    splits.setdefault(split, []).append(name)
  t.save()
  with open(qa_path, "w") as f:
    json.dump(drivelm, f)
  with open(splits_path, "w") as f:
    json.dump(splits, f, indent=1)
  return {"scenes": num, "samples": num * KEYFRAMES, "images": num * KEYFRAMES * len(CAMERAS),
          "width": width, "height": height}


# The ego's behaviour in DriveLM's words (two of its 21 phrases per answer).
_DRIVELM_BEHAVIOUR = {
    "forward": "The ego vehicle is going straight. The ego vehicle is driving with normal speed.",
    "stop": "The ego vehicle is going straight. The ego vehicle is driving slowly.",
    "left": "The ego vehicle is steering to the left. The ego vehicle is driving slowly.",
    "right": "The ego vehicle is steering to the right. The ego vehicle is driving slowly."}
_BEHAVIOUR = {"forward": "The ego vehicle is going straight at a steady speed.",
              "stop": "The ego vehicle is slowing down to a stop.",
              "left": "The ego vehicle is turning left.",
              "right": "The ego vehicle is turning right."}
