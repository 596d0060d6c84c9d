"""Labels derived from a scene graph: the 4 actions and 21 explanations (BDD-OIA order),
a driving instruction, and DriveLM-style QA pairs."""
import numpy as np

from drivlm_jax.data.labels import ACTIONS, FORWARD, LEFT, REASONS, RIGHT, STOP, explanation
from drivlm_jax.sim.scene import LEAD_M, Scene

_BLOCKERS = ("car", "pedestrian", "rider", "obstacle")   # reasons 5..8


def actions_and_reasons(scene: Scene):
  """-> (actions int32 [4], reasons int32 [21]), consistent with the explanations' meaning."""
  r = np.zeros(len(REASONS), np.int32)
  a = np.zeros(len(ACTIONS), np.int32)
  lead = scene.lead_car
  stop_light = scene.light in ("red", "yellow")
  blocking = [bool(scene.in_lane(0, categories=(c,))) for c in _BLOCKERS]
  stop = stop_light or scene.stop_sign or any(blocking)
  r[0] = scene.light == "green"
  r[3] = stop_light
  r[4] = scene.stop_sign
  r[5:9] = blocking
  r[1] = not stop and lead is not None and not lead.stopped
  r[2] = not stop and not scene.in_lane(0, max_distance=LEAD_M)
  a[STOP], a[FORWARD] = stop, not stop
  may_turn = not (stop_light or scene.stop_sign)
  for side, sign, base, action in (("left", -1, 9, LEFT), ("right", 1, 15, RIGHT)):
    lanes = scene.lanes_left if side == "left" else scene.lanes_right
    line = scene.left_line if side == "left" else scene.right_line
    turn_lane = scene.ego_lane == f"{side}_turn"
    obstacles = lanes > 0 and bool(scene.in_lane(sign))
    solid = lanes > 0 and line == "solid"
    can = may_turn and (turn_lane or (lanes > 0 and not obstacles and not solid))
    r[base] = lanes == 0 and not turn_lane          # no lane on that side
    r[base + 1] = obstacles
    r[base + 2] = solid
    r[base + 3] = turn_lane
    r[base + 4] = can and scene.light == "green"    # the light allows the turn
    r[base + 5] = lead is not None and lead.turning == side
    a[action] = can
  return a, r


_INSTRUCTIONS = ("What should the ego car do?", "Is it safe to turn left?",
                 "Is it safe to turn right?", "Can the ego car keep going straight?",
                 "What should the ego car do at the traffic light?")


def instruction(rng: np.random.Generator, scene: Scene) -> str:
  choices = _INSTRUCTIONS if scene.light else _INSTRUCTIONS[:4]
  return str(rng.choice(choices))


def describe(agent) -> str:
  where = {0: "in the ego lane", -1: "in the left lane", 1: "in the right lane"}.get(
      agent.lane, "on the left side" if agent.lane < 0 else "on the right side")
  state = "stopped " if agent.stopped and agent.category == "car" else ""
  return f"a {state}{agent.category} {where} {agent.distance:.0f} m ahead"


def qa_pairs(scene: Scene, actions, reasons) -> dict:
  """DriveLM-style {"perception"|"prediction"|"planning"|"behavior": [{"Q", "A"}]}."""
  near = sorted(scene.agents, key=lambda a: a.distance)[:4]
  objects = [describe(a) for a in near]
  if scene.light:
    objects.insert(0, f"a {scene.light} traffic light")
  if scene.stop_sign:
    objects.insert(0, "a stop sign")
  perception = [{"Q": "What are the important objects in the current scene?",
                 "A": ("There is " + ", ".join(objects) + ".") if objects
                 else "The road ahead is clear."}]
  if scene.light:
    perception.append({"Q": "What is the state of the traffic light?",
                       "A": f"The traffic light is {scene.light}."})
  lead = scene.lead_car
  prediction = []
  if lead is not None:
    future = ("It is going to turn " + lead.turning + "." if lead.turning else
              "It stays stationary." if lead.stopped else "It keeps going straight.")
    prediction.append({"Q": "What will the car ahead in the ego lane do next?", "A": future})
  planning = [{"Q": "What actions can the ego vehicle take, and why?",
               "A": explanation(actions, reasons)}]
  for side, action, base in (("left", LEFT, 9), ("right", RIGHT, 15)):
    why = [REASONS[i] for i in range(base, base + 3) if reasons[i]]
    answer = "Yes." if actions[action] else "No" + (", " + "; ".join(why) if why else "") + "."
    planning.append({"Q": f"Is it safe to turn {side}?", "A": answer})
  behavior = [{"Q": "Predict the behavior of the ego vehicle.",
               "A": "The ego vehicle is slowing down to a stop." if actions[STOP]
               else "The ego vehicle is going straight at a steady speed."}]
  return {"perception": perception, "prediction": prediction, "planning": planning,
          "behavior": behavior}
