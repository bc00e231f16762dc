"""Manifest checks shared by every artifact directory (datasets, targets, routing stores)."""

import json

import pytest

from grouter.artifacts import read_json, read_manifest, write_json
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
    write_json(tmp_path / "manifest.json", {"format": "grouter-thing", "version": 2, "k": 4})
    assert read_manifest(tmp_path, *args) == {"format": "grouter-thing", "version": 2, "k": 4}


def test_json_carries_a_checksum_of_its_content(tmp_path):
    path = tmp_path / "manifest.json"
    args = ("manifest.json", "grouter-thing", 2, "thing store", "grouter make-thing")
    write_json(path, {"format": "grouter-thing", "version": 2, "k": 4, "nested": {"n": [1, 2]}})
    assert read_json(path, "thing")["nested"] == {"n": [1, 2]}
    path.write_text(path.read_text().replace('"k": 4', '"k": 5'))  # one digit: still valid JSON
    for read in (lambda: read_json(path, "thing"), lambda: read_manifest(tmp_path, *args)):
        with pytest.raises(GrouterError, match="does not match its checksum"):
            read()
    path.write_text(json.dumps({"format": "grouter-thing", "version": 2, "k": 4}))  # checksum removed
    assert read_json(path, "thing")["k"] == 4  # third-party JSON may have none ...
    with pytest.raises(GrouterError, match="has no checksum"):
        read_manifest(tmp_path, *args)  # ... a grouter artifact must
