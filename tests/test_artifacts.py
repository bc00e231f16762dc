"""Manifest checks shared by every artifact directory (datasets, targets, routing stores)."""

import json

import pytest

from grouter.artifacts import read_manifest
from grouter.errors import GrouterError


def test_read_manifest_refuses_what_is_not_this_artifact(tmp_path):
    args = ("manifest.json", "grouter-thing", 2, "thing store", "grouter make-thing")
    with pytest.raises(GrouterError, match="thing store .* not found; create it with `grouter make-thing`"):
        read_manifest(tmp_path / "absent", *args)
    with pytest.raises(GrouterError, match=r"is not a grouter thing store \(no manifest.json\)"):
        read_manifest(tmp_path, *args)
    for manifest, message in (({"format": "other", "version": 2}, "format is 'other'"),
                              ({"format": "grouter-thing", "version": 1}, "format version 1 but .* reads version 2"),
                              ("not json", "is corrupt")):
        (tmp_path / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        with pytest.raises(GrouterError, match=message):
            read_manifest(tmp_path, *args)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "grouter-thing", "version": 2, "k": 4}))
    assert read_manifest(tmp_path, *args)["k"] == 4
