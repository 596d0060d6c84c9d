"""The shared label space (BDD-OIA order) and the nuScenes-Drive action rule."""
import numpy as np

ACTIONS = ("forward", "stop_or_slow", "turn_left", "turn_right")
REASONS = (
    "traffic light is green", "follow traffic", "road is clear", "traffic light",
    "traffic sign", "obstacle: car", "obstacle: person", "obstacle: rider", "obstacle: others",
    "no lane on the left", "obstacles on the left lane", "solid line on the left",
    "on the left-turn lane", "traffic light allows (left)", "front car turning left",
    "no lane on the right", "obstacles on the right lane", "solid line on the right",
    "on the right-turn lane", "traffic light allows (right)", "front car turning right",
)
FORWARD, STOP, LEFT, RIGHT = range(4)

FUTURE_S = 3.0          # horizon of the action rule
TURN_OFFSET_M = 2.0     # lateral offset at the horizon, the threshold of VAD's command
KEYFRAME_HZ = 2.0


def yaw_from_quaternion(q):
  """nuScenes [w, x, y, z] -> yaw (rotation about z) in radians."""
  w, x, y, z = q
  return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def actions_from_ego_path(positions, yaw, index, dt=1 / KEYFRAME_HZ):
  """The 4 actions of keyframe `index` from the ego path (DESIGN.md, nuScenes-Drive).

  positions: [K, 2] global x, y of consecutive keyframes; yaw: heading at `index` (rad).
  In the ego frame at `index`, the position 3 s ahead with lateral offset >= +2 m (left)
  gives turn_left, <= -2 m turn_right; a mean future speed below max(1 m/s, 0.7 x the
  current speed) gives stop_or_slow, otherwise forward.
  Returns int32 [4], or None when fewer than 3 s of future exist.

  This is DESIGN.md's rule (the ego origin, in the ego frame). VAD's converter
  (`vad_nuscenes_converter.py`) takes its command from the same +-2 m threshold on the
  LIDAR_TOP sensor's position 3 s ahead in the t0 lidar frame, and pads a path shorter than
  3 s: the lidar sits ~0.9 m ahead of the ego origin, so in a turn its offset is larger by
  ~0.9 m x sin(heading change), and a turn near the threshold can differ.
  """
  steps = int(round(FUTURE_S / dt))
  positions = np.asarray(positions, np.float64)
  if index + steps >= len(positions):
    return None
  delta = positions[index + steps] - positions[index]
  lateral = -np.sin(yaw) * delta[0] + np.cos(yaw) * delta[1]
  current = ego_speed(positions, index, dt)
  future = np.linalg.norm(np.diff(positions[index:index + steps + 1], axis=0), axis=1).sum()
  mean_future = future / (steps * dt)
  actions = np.zeros(4, np.int32)
  actions[LEFT] = lateral >= TURN_OFFSET_M
  actions[RIGHT] = lateral <= -TURN_OFFSET_M
  if mean_future < max(1.0, 0.7 * current):
    actions[STOP] = 1
  else:
    actions[FORWARD] = 1
  return actions


def ego_speed(positions, index, dt=1 / KEYFRAME_HZ):
  """Speed (m/s) at keyframe `index` by finite differences (backward, forward at the start)."""
  positions = np.asarray(positions, np.float64)
  if len(positions) < 2:
    return 0.0
  a, b = (index - 1, index) if index > 0 else (0, 1)
  return float(np.linalg.norm(positions[b] - positions[a]) / dt)


_ACTION_PHRASES = ("keep going forward", "stop or slow down", "turn left", "turn right")


def explanation(actions, reasons) -> str:
  """One sentence: the possible actions and the explanations that hold."""
  doable = [p for p, on in zip(_ACTION_PHRASES, actions) if on]
  why = [REASONS[i] for i in np.flatnonzero(reasons)]
  text = "The ego car can " + " or ".join(doable) if doable else "The ego car must wait"
  return text + (" because: " + "; ".join(why) + "." if why else ".")


def drivelm_tag_mask(tags) -> np.int32:
  """DriveLM's per-QA tag list (0 accuracy, 1 GPT judge, 2 language, 3 match) as bits, as
  the nuScenes-Drive builder stores it: tag t -> 1 << t."""
  return np.int32(sum(1 << int(t) for t in set(tags)))


def drivelm_tags(mask) -> list:
  """The inverse of `drivelm_tag_mask`, sorted."""
  return [t for t in range(4) if int(mask) >> t & 1]
