"""A small rasteriser for the procedural world: ground polygons and cuboids projected through
a pinhole camera (numpy + Pillow), with the domain's appearance applied.

Frames: the road frame (x along the road, y left, z up; the ego frame of a single image)
and the camera frame of nuScenes (x right, y down, z forward).
"""
import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from drivlm_jax.data import geometry
from drivlm_jax.sim import domains
from drivlm_jax.sim.scene import LANE_WIDTH, SIZES, Scene

NEAR = 0.3
LIGHT_X, SIGN_X = 20.0, 16.0   # metres ahead of the ego
_COLOURS = {
    "road": (88, 90, 94), "sidewalk": (150, 148, 140), "grass": (84, 120, 70),
    "line": (235, 235, 230), "arrow": (230, 230, 225), "car": (160, 30, 40),
    "pedestrian": (40, 60, 150), "rider": (200, 140, 20), "obstacle": (240, 110, 20),
    "pole": (70, 70, 70), "housing": (30, 30, 30), "sign": (200, 20, 20),
}
_LAMPS = {"red": (255, 40, 30), "yellow": (255, 200, 30), "green": (40, 255, 90)}
_CAR_PAINTS = ((160, 30, 40), (30, 60, 140), (200, 200, 205), (40, 40, 45), (90, 110, 60))


@dataclasses.dataclass(frozen=True)
class Pinhole:
  width: int
  height: int
  fov_deg: float

  @property
  def intrinsic(self) -> np.ndarray:
    f = (self.width / 2) / np.tan(np.radians(self.fov_deg) / 2)
    return np.array([[f, 0, self.width / 2], [0, f, self.height / 2], [0, 0, 1]])


def camera_to_ego_rotation(yaw: float) -> np.ndarray:
  """Rotation taking camera axes (x right, y down, z forward) into the ego frame for a level
  camera looking `yaw` radians left of the ego's x axis."""
  base = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float64)
  c, s = np.cos(yaw), np.sin(yaw)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ base


def yaw_rotation(yaw: float) -> np.ndarray:
  c, s = np.cos(yaw), np.sin(yaw)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


@dataclasses.dataclass(frozen=True)
class Cuboid:
  """center [3] (road frame, z at mid height), size (width, length, height), yaw (rad)."""
  category: str
  center: tuple
  size: tuple
  yaw: float
  colour: tuple
  index: int = -1           # the agent it draws (-1: scenery such as poles)

  def corners(self) -> np.ndarray:
    w, l, h = self.size
    x = np.array([1, 1, 1, 1, -1, -1, -1, -1]) * l / 2
    y = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w / 2
    z = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * h / 2
    return (yaw_rotation(self.yaw) @ np.stack([x, y, z])).T + np.asarray(self.center)


_FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 4, 7, 3), (1, 5, 6, 2), (0, 1, 5, 4), (3, 2, 6, 7))


def world(scene: Scene, rng: np.random.Generator, agent_centers=None, agent_yaws=None):
  """Scene graph -> (ground polygons [(points [N, 3], colour)], cuboids, lamps) in the road frame.

  agent_centers/agent_yaws override the graph's agent placement (moving agents over time).
  """
  left_edge = (scene.lanes_left + 0.5) * LANE_WIDTH
  right_edge = -(scene.lanes_right + 0.5) * LANE_WIDTH
  x0, x1 = -60.0, 140.0

  def strip(ya, yb, xa=x0, xb=x1, z=0.0):
    return np.array([[xa, ya, z], [xb, ya, z], [xb, yb, z], [xa, yb, z]])

  ground = [(strip(left_edge, left_edge + 3.5, z=0.01), _COLOURS["sidewalk"]),
            (strip(right_edge - 3.5, right_edge, z=0.01), _COLOURS["sidewalk"]),
            (strip(right_edge, left_edge), _COLOURS["road"])]
  for k in range(-scene.lanes_right - 1, scene.lanes_left + 1):
    y = (k + 0.5) * LANE_WIDTH
    if k == 0:
      style = scene.left_line
    elif k == -1:
      style = scene.right_line
    else:
      style = "solid" if k in (-scene.lanes_right - 1, scene.lanes_left) else "dashed"
    if style == "solid":
      ground.append((strip(y - 0.08, y + 0.08, z=0.02), _COLOURS["line"]))
    else:
      phase = rng.uniform(0, 9)
      for xa in np.arange(x0 + phase, x1, 9.0):
        ground.append((strip(y - 0.07, y + 0.07, xa, xa + 3.0, z=0.02), _COLOURS["line"]))
  if scene.ego_lane != "normal":   # a painted turn arrow in the ego lane
    s = 1.0 if scene.ego_lane == "left_turn" else -1.0
    arrow = [(9, -0.15), (12, -0.15), (12, -0.45), (14, 0.6 * s), (12, 0.45), (12, 0.15),
             (9, 0.15)]
    ground.append((np.array([[x, y, 0.03] for x, y in arrow]), _COLOURS["arrow"]))

  cuboids = []
  for i, agent in enumerate(scene.agents):
    w, l, h = SIZES[agent.category]
    center = (agent.distance, agent.y, h / 2) if agent_centers is None else agent_centers[i]
    yaw = 0.0 if agent_yaws is None else agent_yaws[i]
    colour = (_CAR_PAINTS[int(rng.integers(len(_CAR_PAINTS)))] if agent.category == "car"
              else _COLOURS[agent.category])
    cuboids.append(Cuboid(agent.category, tuple(center), (w, l, h), yaw, colour, i))
  lamps = []
  # Signals are larger than life so that a low-resolution camera still sees their state.
  if scene.light:
    cuboids.append(Cuboid("pole", (LIGHT_X, right_edge - 0.6, 2.5), (0.25, 0.25, 5.0), 0.0,
                          _COLOURS["pole"]))
    cuboids.append(Cuboid("housing", (LIGHT_X, 0.0, 4.6), (1.2, 0.5, 3.0), 0.0,
                          _COLOURS["housing"]))
    z = {"red": 5.6, "yellow": 4.6, "green": 3.6}[scene.light]
    lamps.append((np.array([LIGHT_X - 0.26, 0.0, z]), 0.45, _LAMPS[scene.light]))
  if scene.stop_sign:
    cuboids.append(Cuboid("pole", (SIGN_X, right_edge - 1.0, 1.1), (0.1, 0.1, 2.2), 0.0,
                          _COLOURS["pole"]))
    angles = np.radians(22.5 + 45 * np.arange(8))
    octagon = np.stack([np.full(8, SIGN_X - 0.05), right_edge - 1.0 + 1.0 * np.cos(angles),
                        2.6 + 1.0 * np.sin(angles)], 1)
    ground.append((octagon, _COLOURS["sign"]))
  return ground, cuboids, lamps


def _to_camera(points, rotation, translation):
  """Road-frame points [N, 3] -> camera frame, for a camera at `translation` whose axes
  `rotation` maps into the road frame."""
  return (np.asarray(points) - translation) @ rotation


def _clip_near(points):
  """Sutherland-Hodgman clip of a camera-frame polygon against z >= NEAR."""
  out = []
  n = len(points)
  for i in range(n):
    a, b = points[i], points[(i + 1) % n]
    ina, inb = a[2] >= NEAR, b[2] >= NEAR
    if ina:
      out.append(a)
    if ina != inb:
      t = (NEAR - a[2]) / (b[2] - a[2])
      out.append(a + t * (b - a))
  return np.array(out)


def _project(points, k):
  uv = points @ k.T
  return uv[:, :2] / uv[:, 2:3]


def _shade(colour, factor, domain, depth):
  c = np.asarray(colour, np.float32) * factor
  if domain.time == "night":
    c = c * 0.22
  if domain.weather == "fog":
    haze = np.array([185, 188, 192]) * (0.3 if domain.time == "night" else 1.0)
    c = c + (1 - np.exp(-depth / 35.0)) * (haze - c)
  elif domain.weather in ("rain", "snow"):
    c = c * 0.85 + (1 - np.exp(-depth / 90.0)) * 30
  return tuple(int(v) for v in np.clip(c, 0, 255))


def render(ground, cuboids, lamps, pinhole: Pinhole, rotation, translation,
           domain: domains.Domain, rng: np.random.Generator):
  """-> (PIL RGB image, [(agent index, category, [x1, y1, x2, y2])] of visible agents)."""
  w, h = pinhole.width, pinhole.height
  k = pinhole.intrinsic
  sky = {"day": (135, 175, 225), "night": (12, 14, 26)}[domain.time]
  if domain.weather == "fog":
    sky = (57, 58, 60) if domain.time == "night" else (190, 192, 196)
  elif domain.weather in ("rain", "snow"):
    sky = tuple(int(c * 0.7 + 40) for c in sky)
  image = Image.new("RGB", (w, h), sky)
  draw = ImageDraw.Draw(image)
  horizon = int(round(k[1, 2]))   # cameras are level
  grass = _COLOURS["sidewalk"] if domain.weather == "snow" else _COLOURS["grass"]
  draw.rectangle([0, max(horizon, 0), w, h], fill=_shade(grass, 1.0, domain, 60.0))

  for points, colour in ground:
    cam = _clip_near(_to_camera(points, rotation, translation))
    if len(cam) >= 3:
      if domain.weather == "snow" and colour == _COLOURS["road"]:
        colour = tuple(int(0.6 * c + 0.4 * 230) for c in colour)   # slush on the road
      draw.polygon([tuple(p) for p in _project(cam, k)],
                   fill=_shade(colour, 1.0, domain, float(np.mean(cam[:, 2]))))

  boxes = []
  order = sorted(cuboids, key=lambda c: -np.linalg.norm(np.asarray(c.center) - translation))
  for cuboid in order:
    corners = _to_camera(cuboid.corners(), rotation, translation)
    if np.all(corners[:, 2] < NEAR):
      continue
    centre = corners.mean(0)
    faces = []
    for face in _FACES:
      pts = corners[list(face)]
      normal = np.cross(pts[1] - pts[0], pts[2] - pts[0])
      outward = pts.mean(0) - centre
      if np.dot(normal, outward) < 0:
        normal = -normal
      if np.dot(normal, pts.mean(0)) < 0:     # faces the camera
        faces.append((np.linalg.norm(pts.mean(0)), pts, 0.75 + 0.25 * abs(normal[1]) /
                      (np.linalg.norm(normal) + 1e-9)))
    for depth, pts, light in sorted(faces, key=lambda f: -f[0]):
      clipped = _clip_near(pts)
      if len(clipped) >= 3:
        draw.polygon([tuple(p) for p in _project(clipped, k)],
                     fill=_shade(cuboid.colour, light, domain, depth))
    if cuboid.category == "car" and domain.time == "night":
      for lamp_y in (-0.6, 0.6):   # tail and head lights glow at night
        for end, colour in ((-1, (255, 40, 40)), (1, (255, 250, 210))):
          offset = yaw_rotation(cuboid.yaw) @ np.array([end * cuboid.size[1] / 2, lamp_y, -0.1])
          if np.dot(offset, translation - np.asarray(cuboid.center)) > 0:   # faces us
            lamp = np.asarray(cuboid.center) + offset
            _dot(draw, _to_camera(lamp[None], rotation, translation)[0], 0.12, colour, k)
    if cuboid.index >= 0:
      box = geometry.box_in_image(corners, k, w, h)
      if box is not None:
        boxes.append((cuboid.index, cuboid.category, box))
  for centre, radius, colour in lamps:
    _dot(draw, _to_camera(centre[None], rotation, translation)[0], radius, colour, k)

  if domain.weather == "rain":
    for _ in range(int(w * h / 900)):
      x, y = rng.uniform(0, w), rng.uniform(0, h)
      draw.line([(x, y), (x - 3, y + 14)], fill=(170, 175, 185), width=1)
    image = image.filter(ImageFilter.GaussianBlur(0.8))
  elif domain.weather == "snow":
    for _ in range(int(w * h / 500)):
      x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.6, 2.0)
      draw.ellipse([x - r, y - r, x + r, y + r], fill=(245, 245, 250))
  pixels = domains.colour_response(np.asarray(image), domain.camera_variant)
  if domain.sensor:
    pixels = domains.sensor_response(pixels, domains.SENSORS[domain.sensor], rng)
  return Image.fromarray(pixels), sorted(boxes)


def _dot(draw, centre_cam, radius, colour, k):
  if centre_cam[2] <= NEAR:
    return
  u, v = _project(centre_cam[None], k)[0]
  r = max(1.0, k[0, 0] * radius / centre_cam[2])
  draw.ellipse([u - r, v - r, u + r, v + r], fill=colour)
