import json

import pytest

from ditrt.runtime.errors import ManifestError
from ditrt.runtime.manifest import SCHEMA_VERSION, Manifest, load_manifest
from ditrt.runtime.pipeline import Pipeline


def edit_manifest(folder, fn):
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_manifest_round_trips(digits_engine):
    m = load_manifest(digits_engine)
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    assert m.schema_version == SCHEMA_VERSION and m.components["denoiser"].file in m.files
    assert m.export["versions"]["torch"] and m.export["training"]["steps"] > 0


def test_missing_folder(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        Pipeline.load(tmp_path / "nope")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match="has no manifest.json"):
        Pipeline.load(tmp_path)


def test_unknown_schema_version(engine_copy):
    edit_manifest(engine_copy, lambda d: d.update(schema_version=99))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        Pipeline.load(engine_copy)


def test_unknown_key(engine_copy):
    edit_manifest(engine_copy, lambda d: d["scheduler"].update(karras=True))
    with pytest.raises(ManifestError, match="'scheduler' has unknown key.*'karras'"):
        Pipeline.load(engine_copy)


def test_not_json(engine_copy):
    (engine_copy / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Pipeline.load(engine_copy)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "denoiser/../../x.onnx"])
def test_path_outside_folder(engine_copy, bad):
    def point_outside(d):
        d["files"][bad] = d["files"].pop("denoiser/model.onnx")
        d["components"]["denoiser"]["file"] = bad

    edit_manifest(engine_copy, point_outside)
    with pytest.raises(ManifestError, match="points outside the engine folder"):
        Pipeline.load(engine_copy)


def test_sha256_mismatch(engine_copy):
    onnx_file = engine_copy / "denoiser" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="'denoiser/model.onnx' does not match its sha256"):
        Pipeline.load(engine_copy)


def test_truncated_onnx_is_caught_by_size(engine_copy):
    onnx_file = engine_copy / "denoiser" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(ManifestError, match="has 1000 bytes.*truncated"):
        Pipeline.load(engine_copy)


def test_truncated_onnx_without_verify_is_a_clear_load_error(engine_copy):
    onnx_file = engine_copy / "denoiser" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(ManifestError, match="ONNX Runtime cannot load .*model.onnx"):
        Pipeline.load(engine_copy, verify=False)


def test_missing_file(engine_copy):
    (engine_copy / "denoiser" / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="'denoiser/model.onnx' is missing"):
        Pipeline.load(engine_copy)


def test_manifest_that_links_out_of_the_folder(engine_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    (engine_copy / "manifest.json").rename(elsewhere)
    (engine_copy / "manifest.json").symlink_to(elsewhere)
    with pytest.raises(ManifestError, match="'manifest.json' points outside the engine folder"):
        Pipeline.load(engine_copy)
