"""Domains: appearance only (time of day, weather, camera); labels never depend on them.

A domain name joins conditions with "+": `day`, `night`, `fog`, `rain`, `snow`, a camera
variant `cam_wide` (100 deg field of view, cool colour response, 800x450) or `cam_tele`
(50 deg, warm and flat response, 512x288), and a sensor pipeline `sensor_lowcost` (optics
blur, read noise, a green cast with less saturation, and strong JPEG compression on the
camera; scene, lighting and field of view unchanged); e.g. `night+rain`, `fog+cam_wide`,
`day+sensor_lowcost`.
"""
import io
import dataclasses

import numpy as np
from PIL import Image, ImageFilter

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
class Sensor:
  """What a camera's electronics do to the optical image."""
  blur: float             # Gaussian blur radius, px at 640 wide (scaled with the width)
  noise: float            # read noise std, in 0..255 levels
  colour: tuple           # 3x3 colour matrix, row-major
  jpeg_quality: int       # the camera's own compression (before the dataset's JPEG)


SENSORS = {
    "sensor_lowcost": Sensor(blur=1.6, noise=9.0, jpeg_quality=18,
                             colour=(0.75, 0.2, 0.05, 0.1, 0.85, 0.05, 0.05, 0.2, 0.7)),
}


@dataclasses.dataclass(frozen=True)
class Domain:
  name: str
  time: str = "day"
  weather: str | None = None
  camera: str = "cam_default"
  sensor: str | None = None

  @property
  def camera_variant(self) -> CameraVariant:
    return CAMERAS[self.camera]

  @property
  def description(self) -> str:
    """nuScenes-style scene description words, e.g. "night, rain"."""
    return ", ".join(p for p in (self.time, self.weather) if p)


def parse_domain(name: str) -> Domain:
  time, weather, camera, sensor = "day", None, "cam_default", None
  for part in filter(None, name.split("+")):
    if part in TIMES:
      time = part
    elif part in WEATHERS:
      if weather is not None:
        raise ValueError(f"domain {name!r}: more than one weather ({weather}, {part})")
      weather = part
    elif part in CAMERAS:
      camera = part
    elif part in SENSORS:
      sensor = part
    else:
      raise ValueError(f"domain {name!r}: unknown condition {part!r}; known: "
                       f"{list(TIMES) + list(WEATHERS) + sorted(CAMERAS) + sorted(SENSORS)}")
  return Domain(name, time, weather, camera, sensor)


def colour_response(image: np.ndarray, variant: CameraVariant) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 through the camera's colour matrix and gamma."""
  x = image.astype(np.float32) / 255.0
  x = x @ np.asarray(variant.colour, np.float32).reshape(3, 3).T
  x = np.clip(x, 0, 1) ** variant.gamma
  return (x * 255 + 0.5).astype(np.uint8)


def sensor_response(image: np.ndarray, sensor: Sensor, rng: np.random.Generator) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 through the sensor: blur, colour, noise, JPEG."""
  pil = Image.fromarray(image).filter(
      ImageFilter.GaussianBlur(sensor.blur * image.shape[1] / 640.0))
  x = np.asarray(pil).astype(np.float32) @ np.asarray(sensor.colour, np.float32).reshape(3, 3).T
  x = x + rng.normal(0.0, sensor.noise, x.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8)).save(
      buffer, format="JPEG", quality=sensor.jpeg_quality)
  return np.asarray(Image.open(buffer).convert("RGB"))
