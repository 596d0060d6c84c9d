"""Scene graphs of the procedural driving world, sampled from a seed.

Coordinates are the ego frame at the frame's time: x forward, y left, z up (metres), ego lane
centred on y = 0, lanes LANE_WIDTH wide. The graph holds semantics only; appearance (time of
day, weather, camera) is the domain's and never changes a label.
"""
import dataclasses

import numpy as np

LANE_WIDTH = 3.5
CATEGORIES = ("car", "pedestrian", "rider", "obstacle")
SIZES = {  # width, length, height (m)
    "car": (1.9, 4.5, 1.5), "pedestrian": (0.6, 0.6, 1.75), "rider": (0.7, 1.8, 1.7),
    "obstacle": (0.6, 0.6, 0.9)}
NEAR_M = 15.0   # an object closer than this in a lane blocks it
LEAD_M = 35.0   # a car ahead closer than this is one the ego follows


@dataclasses.dataclass(frozen=True)
class Agent:
  category: str
  lane: int                  # 0 ego lane, -1 left neighbour, +1 right neighbour, ...
  distance: float            # metres ahead of the ego (x)
  offset: float = 0.0        # lateral offset within the lane (m)
  turning: str | None = None  # "left" | "right" for cars signalling a turn
  stopped: bool = False

  @property
  def y(self) -> float:
    return -self.lane * LANE_WIDTH + self.offset


@dataclasses.dataclass(frozen=True)
class Scene:
  lanes_left: int            # lanes left of the ego lane
  lanes_right: int
  ego_lane: str              # "normal" | "left_turn" | "right_turn"
  left_line: str             # "solid" | "dashed": the line on the ego lane's left
  right_line: str
  light: str | None          # None | "red" | "yellow" | "green"
  stop_sign: bool
  agents: tuple

  def in_lane(self, lane, max_distance=NEAR_M, categories=CATEGORIES):
    return [a for a in self.agents if a.lane == lane and 0 < a.distance < max_distance
            and a.category in categories]

  @property
  def lead_car(self):
    cars = [a for a in self.agents if a.lane == 0 and a.category == "car"
            and 0 < a.distance < LEAD_M]
    return min(cars, key=lambda a: a.distance) if cars else None


def sample_scene(rng: np.random.Generator, require: str | None = None) -> Scene:
  """A random scene; `require` in {"forward", "stop", "left", "right"} biases it so that the
  ego can (forward/left/right) or must (stop) take that action."""
  lanes_left = int(rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2]))
  lanes_right = int(rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2]))
  ego_lane = str(rng.choice(["normal", "left_turn", "right_turn"], p=[0.7, 0.15, 0.15]))
  if ego_lane == "left_turn":
    lanes_left = 0
  if ego_lane == "right_turn":
    lanes_right = 0
  light = rng.choice([None, "red", "yellow", "green"], p=[0.35, 0.25, 0.1, 0.3])
  stop_sign = light is None and rng.random() < 0.2
  left_line = "solid" if lanes_left == 0 or rng.random() < 0.3 else "dashed"
  right_line = "solid" if lanes_right == 0 or rng.random() < 0.3 else "dashed"

  stop_cause = None
  if require == "stop" and light not in ("red", "yellow") and not stop_sign:
    stop_cause = str(rng.choice(["light", "sign", "car"]))
    if stop_cause == "light" or (stop_cause == "sign" and light is not None):
      light = "red"
    elif stop_cause == "sign":
      stop_sign = True
  elif require in ("forward", "left", "right"):
    light, stop_sign = rng.choice([None, "green"]), False
  if require == "left":
    ego_lane, lanes_left = (("left_turn", 0) if rng.random() < 0.5
                            else ("normal", max(1, lanes_left)))
    left_line = "solid" if ego_lane == "left_turn" else "dashed"
  if require == "right":
    ego_lane, lanes_right = (("right_turn", 0) if rng.random() < 0.5
                             else ("normal", max(1, lanes_right)))
    right_line = "solid" if ego_lane == "right_turn" else "dashed"

  agents = []
  lanes = range(-lanes_left, lanes_right + 1)
  for _ in range(int(rng.integers(0, 7))):
    category = str(rng.choice(CATEGORIES, p=[0.55, 0.2, 0.12, 0.13]))
    lane = int(rng.choice(lanes))
    distance = float(rng.uniform(6, 70))
    if category == "pedestrian" and rng.random() < 0.5:   # on the sidewalk
      lane = -lanes_left - 1 if rng.random() < 0.5 else lanes_right + 1
    turning = None
    if category == "car" and rng.random() < 0.25:
      turning = str(rng.choice(["left", "right"]))
    agents.append(Agent(category, lane, distance, float(rng.uniform(-0.4, 0.4)), turning,
                        stopped=bool(rng.random() < 0.3)))
  if require in ("forward", "left", "right"):
    # Keep the way clear: nothing blocking the ego lane or the lane turned into.
    blocked = {0} | ({-1} if require == "left" else set()) | ({1} if require == "right" else set())
    agents = [a for a in agents if not (a.lane in blocked and a.distance < NEAR_M + 5)]
  if stop_cause == "car":
    agents.append(Agent("car", 0, float(rng.uniform(7, 12)), stopped=True))
  return Scene(lanes_left, lanes_right, ego_lane, left_line, right_line,
               None if light is None else str(light), bool(stop_sign), tuple(agents))
