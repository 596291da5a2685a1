"""Writes that never leave a half-written file: the data goes to a temporary file beside
the target, which replaces the target only once complete (`os.replace` is atomic on
POSIX). A failed write (disk full, read-only storage) leaves the earlier file as it was
and raises one `OSError` that names the file."""
from __future__ import annotations

import json
import os
from typing import Any


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` atomically; on failure the old `path` is untouched."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    reason = " ".join(str(e.strerror or e).split())
    raise OSError(f"could not write {path} ({reason}); the previous version, if any, is "
                  "intact: free space or fix the storage and rerun") from None


def write_json(path: str, obj: Any, **kwargs: Any) -> None:
  """`json.dump(obj, indent=2, ...)` to `path`, atomically."""
  write_atomic(path, json.dumps(obj, indent=2, **kwargs))
