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
  """Global corners -> the 2D box [x1, y1, x2, y2] (pixels) in the camera's image, as the
  devkit's `export_2d_annotations_as_json` makes it (`box_in_image`); None when it has none."""
  p = (corners - ego_pose["translation"]) @ rotation_matrix(ego_pose["rotation"])
  p = (p - calibrated_sensor["translation"]) @ rotation_matrix(calibrated_sensor["rotation"])
  return box_in_image(p, np.asarray(calibrated_sensor["camera_intrinsic"]), width, height)


def box_in_image(corners_cam, intrinsic, width, height):
  """Camera-frame corners [8, 3] -> [x1, y1, x2, y2]: the bounds of the part of the image
  [0, width] x [0, height] that the convex hull of the projected corners in front of the
  camera (z > 0) covers, the rule of the devkit's `post_process_coords`. None when no corner
  is in front, or the hull covers no area of the image (the devkit drops a hull that misses
  the image, and fails on one that only touches it)."""
  front = corners_cam[corners_cam[:, 2] > 0]
  if len(front) == 0:
    return None
  uv = front @ intrinsic.T
  return hull_in_image(uv[:, :2] / uv[:, 2:3], width, height)


def hull_in_image(points, width, height):
  """Pixel points [N, 2] -> [x1, y1, x2, y2], the bounds of their convex hull cut to the
  image [0, width] x [0, height]; None where that has no area."""
  polygon = _clip_to_rectangle(_convex_hull(points), width, height)
  if len(polygon) < 3 or _area(polygon) <= 0:
    return None
  (x1, y1), (x2, y2) = polygon.min(0), polygon.max(0)
  return [float(x1), float(y1), float(x2), float(y2)]


def _convex_hull(points):
  """Counter-clockwise convex hull [M, 2] of `points` [N, 2] (Andrew's monotone chain)."""
  points = sorted(set(map(tuple, np.asarray(points, np.float64))))
  if len(points) < 3:
    return np.array(points).reshape(-1, 2)

  def half(seq):
    chain = []
    for p in seq:
      while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
        chain.pop()
      chain.append(p)
    return chain[:-1]

  return np.array(half(points) + half(points[::-1]))


def _cross(o, a, b):
  return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _clip_to_rectangle(polygon, width, height):
  """Sutherland-Hodgman: the convex `polygon` [M, 2] cut to [0, width] x [0, height]."""
  for axis, bound, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False),
                                  (1, height, True)):
    if len(polygon) == 0:
      break
    inside = polygon[:, axis] <= bound if keep_below else polygon[:, axis] >= bound
    out = []
    for i in range(len(polygon)):
      p, q = polygon[i - 1], polygon[i]
      if inside[i - 1] != inside[i]:
        # From the inside end: from a far outside one (a corner just in front of the camera
        # projects to ~1e15 px) the difference would cancel the digits.
        a, b = (p, q) if inside[i - 1] else (q, p)
        cut = a + (bound - a[axis]) / (b[axis] - a[axis]) * (b - a)
        cut[axis] = bound
        out.append(cut)
      if inside[i]:
        out.append(q)
    polygon = np.array(out).reshape(-1, 2)
  return polygon


def _area(polygon):
  x, y = polygon[:, 0], polygon[:, 1]
  return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
