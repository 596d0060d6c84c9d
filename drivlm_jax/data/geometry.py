"""nuScenes geometry in numpy: quaternions, box corners, projection into a camera."""
import numpy as np


def rotation_matrix(q):
  """[w, x, y, z] -> 3x3 rotation matrix."""
  w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
  return np.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def box_corners(center, size, rotation):
  """Global corners [8, 3] of a sample_annotation box (size = width, length, height), in the
  devkit's `Box.corners()` order."""
  w, l, h = size
  x = l / 2 * np.array([1, 1, 1, 1, -1, -1, -1, -1])
  y = w / 2 * np.array([1, -1, -1, 1, 1, -1, -1, 1])
  z = h / 2 * np.array([1, 1, -1, -1, 1, 1, -1, -1])
  return (rotation_matrix(rotation) @ np.stack([x, y, z])).T + np.asarray(center)


def project_box(corners, ego_pose, calibrated_sensor, width, height):
  """Global corners -> the 2D box [x1, y1, x2, y2] (pixels) of the corners in front of the
  camera, clipped to the image; None when none is in front or the box misses the image."""
  p = (corners - ego_pose["translation"]) @ rotation_matrix(ego_pose["rotation"])
  p = (p - calibrated_sensor["translation"]) @ rotation_matrix(calibrated_sensor["rotation"])
  return box_in_image(p, np.asarray(calibrated_sensor["camera_intrinsic"]), width, height)


def box_in_image(corners_cam, intrinsic, width, height):
  """Camera-frame corners [8, 3] -> [x1, y1, x2, y2] of the corners in front of the camera,
  clipped to the image; None when none is in front or the box misses the image."""
  front = corners_cam[corners_cam[:, 2] > 0.1]
  if len(front) == 0:
    return None
  uv = front @ intrinsic.T
  uv = uv[:, :2] / uv[:, 2:3]
  x1, y1 = np.clip(uv.min(0), 0, [width, height])
  x2, y2 = np.clip(uv.max(0), 0, [width, height])
  if x2 - x1 < 1 or y2 - y1 < 1:
    return None
  return [float(x1), float(y1), float(x2), float(y2)]
