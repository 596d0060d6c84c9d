"""A real GCS API on 127.0.0.1 (gcp-storage-emulator, in-process) and the environment that
points gcsfs/epath, google-cloud-storage and Orbax's tensorstore at it."""
import contextlib
import os
import socket

from gcp_storage_emulator.server import create_server

BUCKET = "bucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def emulator():
  """Yields the environment (a dict) under which clients reach the emulator; it is also set
  in os.environ while the emulator runs."""
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "GOOGLE_CLOUD_PROJECT": "test"}
  saved = {k: os.environ.get(k) for k in env}
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
