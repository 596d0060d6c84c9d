"""Domains: appearance only (time of day, weather, camera); labels never depend on them.

A domain name joins conditions with "+": `day`, `night`, `fog`, `rain`, `snow` and a camera
variant `cam_wide` (100 deg field of view, cool colour response, 800x450) or `cam_tele`
(50 deg, warm and flat response, 512x288); e.g. `night+rain`, `fog+cam_wide`.
"""
import dataclasses

import numpy as np

TIMES = ("day", "night")
WEATHERS = ("fog", "rain", "snow")


@dataclasses.dataclass(frozen=True)
class CameraVariant:
  fov_deg: float
  width: int
  height: int
  colour: tuple           # 3x3 colour response, row-major
  gamma: float = 1.0


CAMERAS = {
    "cam_default": CameraVariant(70.0, 640, 360, (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "cam_wide": CameraVariant(100.0, 800, 450, (0.9, 0.05, 0.05, 0.0, 1.0, 0.05, 0.0, 0.1, 1.15),
                              gamma=0.9),
    "cam_tele": CameraVariant(50.0, 512, 288, (1.1, 0.1, 0.0, 0.05, 0.95, 0.0, 0.0, 0.05, 0.75),
                              gamma=1.15),
}


@dataclasses.dataclass(frozen=True)
class Domain:
  name: str
  time: str = "day"
  weather: str | None = None
  camera: str = "cam_default"

  @property
  def camera_variant(self) -> CameraVariant:
    return CAMERAS[self.camera]

  @property
  def description(self) -> str:
    """nuScenes-style scene description words, e.g. "night, rain"."""
    return ", ".join(p for p in (self.time, self.weather) if p)


def parse_domain(name: str) -> Domain:
  time, weather, camera = "day", None, "cam_default"
  for part in filter(None, name.split("+")):
    if part in TIMES:
      time = part
    elif part in WEATHERS:
      if weather is not None:
        raise ValueError(f"domain {name!r}: more than one weather ({weather}, {part})")
      weather = part
    elif part in CAMERAS:
      camera = part
    else:
      raise ValueError(f"domain {name!r}: unknown condition {part!r}; known: "
                       f"{list(TIMES) + list(WEATHERS) + sorted(CAMERAS)}")
  return Domain(name, time, weather, camera)


def colour_response(image: np.ndarray, variant: CameraVariant) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 through the camera's colour matrix and gamma."""
  x = image.astype(np.float32) / 255.0
  x = x @ np.asarray(variant.colour, np.float32).reshape(3, 3).T
  x = np.clip(x, 0, 1) ** variant.gamma
  return (x * 255 + 0.5).astype(np.uint8)
