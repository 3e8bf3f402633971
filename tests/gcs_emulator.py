"""Starts gcp-storage-emulator with the object-generation handling that real GCS has on downloads.

`python tests/gcs_emulator.py start --host ... --port ...` takes the emulator's own arguments.

The emulator (PyPI gcp-storage-emulator) serves object bodies without the `x-goog-generation`
header and ignores `ifGenerationMatch` / `ifGenerationNotMatch` on reads. Real GCS sends the
header on every media download and answers 304 / 412 to those preconditions, and tensorstore
(orbax's OCDBT checkpoints) relies on both: it re-reads a manifest it just wrote with
ifGenerationNotMatch=<its generation>, and without a generation in the answer it fails with
"Malformed StorageGeneration". This launcher adds exactly that behaviour to the emulator's
download handler before its server is built; everything else is the emulator as published.
"""
from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_published_download = objects.download


def _first(query, name):
  values = query.get(name)
  return values[0] if values else None


def download_with_generations(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return _published_download(request, response, storage, *args, **kwargs)   # the emulator's 404
  generation = str(obj["generation"])
  not_match = _first(request.query, "ifGenerationNotMatch")
  match = _first(request.query, "ifGenerationMatch")
  if not_match is not None and not_match == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return None
  if match is not None and match != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
    return None
  response["x-goog-generation"] = generation
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _published_download(request, response, storage, *args, **kwargs)


# objects.get (alt=media) calls `download` through the module, and the server's route table
# is built from `objects.download` when gcp_storage_emulator.server is first imported: patch first.
objects.download = download_with_generations

from gcp_storage_emulator.__main__ import main  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  main(sys.argv[1:])
