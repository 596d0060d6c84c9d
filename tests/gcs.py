"""A real GCS API on 127.0.0.1 (gcp-storage-emulator, in-process) and the environment that
points gcsfs/epath, google-cloud-storage and Orbax's tensorstore at it.

The emulator leaves out two parts of the GCS JSON API that tensorstore's OCDBT driver (Orbax's
default format) relies on, so `emulator()` adds them to its routes, as GCS documents them
(cloud.google.com/storage/docs/generations-preconditions):
- a media download carries the object's generation in `x-goog-generation` (tensorstore reads
  it there; without it every second read of `manifest.ocdbt` fails "Malformed
  StorageGeneration");
- `ifGenerationMatch` / `ifGenerationNotMatch` on reads and uploads answer 412 / 304 (an
  upload with `ifGenerationMatch=0` fails when the object exists), so OCDBT's atomic manifest
  updates are checked as on GCS, not silently overwritten.
"""
import contextlib
import functools
import os
import socket
import threading
from http import HTTPStatus

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

BUCKET = "bucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _generation(storage, bucket: str, name: str) -> int:
  """The object's generation; 0 when it does not exist (GCS's meaning of generation 0)."""
  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return 0


def _failed_precondition(request, storage, bucket: str, name: str) -> HTTPStatus | None:
  query, current = request.query, _generation(storage, bucket, name)
  if "ifGenerationMatch" in query and int(query["ifGenerationMatch"][0]) != current:
    return HTTPStatus.PRECONDITION_FAILED
  if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"][0]) == current:
    return HTTPStatus.NOT_MODIFIED
  return None


def _checked_read(handler):
  @functools.wraps(handler)
  def read(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    status = _failed_precondition(request, storage, bucket, name)
    if status is not None:
      response.status = status
      return None
    result = handler(request, response, storage, *args, **kwargs)
    generation = _generation(storage, bucket, name)
    if generation:
      response["x-goog-generation"] = str(generation)
      response["x-goog-metageneration"] = "1"
    return result
  return read


def _checked_upload(handler, lock):
  @functools.wraps(handler)
  def upload(request, response, storage, *args, **kwargs):
    name = request.query.get("name", [None])[0]
    with lock:    # the check and the write are one step, as on GCS
      if name is not None:
        status = _failed_precondition(request, storage, request.params["bucket_name"], name)
        if status is not None:
          response.status = HTTPStatus.PRECONDITION_FAILED
          return None
      return handler(request, response, storage, *args, **kwargs)
  return upload


@contextlib.contextmanager
def _generation_semantics():
  lock = threading.Lock()
  wrapped = {objects.download: _checked_read(objects.download),
             objects.get: _checked_read(objects.get),
             objects.insert: _checked_upload(objects.insert, lock)}
  saved = emulator_server.HANDLERS
  emulator_server.HANDLERS = tuple(
      (regex, {method: wrapped.get(fn, fn) for method, fn in routes.items()})
      for regex, routes in saved)
  try:
    yield
  finally:
    emulator_server.HANDLERS = saved


@contextlib.contextmanager
def emulator():
  """Yields the environment (a dict) under which clients reach the emulator; it is also set
  in os.environ while the emulator runs."""
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "GOOGLE_CLOUD_PROJECT": "test"}
  saved = {k: os.environ.get(k) for k in env}
  with _generation_semantics():
    server.start()
    os.environ.update(env)
    try:
      yield env
    finally:
      server.stop()
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
