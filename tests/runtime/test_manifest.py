"""runtime.manifest: the folder format, and refusal of tampered or unknown folders."""

from __future__ import annotations

import json
import shutil

import pytest

import runtime
from export.exporter import LINEAGE_KEYS
from runtime import manifest as mf


@pytest.fixture
def folder(hyperadam_folder, tmp_path):
    copy = tmp_path / "opt"
    shutil.copytree(hyperadam_folder, copy)
    return copy


def edit_manifest(folder, change):
    path = folder / mf.MANIFEST_FILE
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_manifest_round_trips_and_names_every_file(folder):
    manifest = mf.load_manifest(folder)
    assert manifest.method == mf.HYPERADAM and manifest.config == {"num_candidates": 20}
    assert manifest.default_lr == 0.005 and manifest.opset >= 18 and manifest.ir_version <= 13
    roles = (mf.FUSED, mf.STATE_STAGE, mf.UPDATE_STAGE)
    assert set(manifest.files) == {*(mf.GRAPH_FILES[r] for r in roles), mf.THETA_FILE}
    assert set(manifest.graphs) == {mf.FUSED, mf.STATE_STAGE, mf.UPDATE_STAGE}
    assert manifest.state == mf.hyperadam_layout(20)
    assert manifest.state.bytes_per_coordinate == 480  # 6·J floats (design §3.1)
    assert set(manifest.lineage) == {*LINEAGE_KEYS, "theta_sha256"}
    assert manifest.parity["passed"] is True
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.versions)
    assert mf.load_manifest(folder) == manifest  # stable


def test_layout_names_are_the_reference_state_fields():
    from meta_train.optimizers import LEARNED_OPTIMIZERS, DMState, HyperAdamState, RNNpropState

    tensorwise = {  # variants of hyperadam
        mf.HYPERADAM_TENSOR,
        mf.HYPERADAM_TENSOR_UNBOUNDED,
        mf.HYPERADAM_TENSOR_ADAPTIVE,
        mf.HYPERADAM_TENSOR_TREND,
        mf.HYPERADAM_TENSOR_TREND_ANNEALED,
    }
    assert set(mf.METHODS) == set(LEARNED_OPTIMIZERS) | tensorwise
    assert HyperAdamState._fields == mf.HYPERADAM_FIELDS
    assert DMState._fields == mf.DM_FIELDS
    assert RNNpropState._fields == mf.RNNPROP_FIELDS
    layout = mf.rnnprop_layout(20)
    assert [f.name for f in layout.fields] + [c.name for c in layout.carried] == [
        n for n in RNNpropState._fields if n != "step"
    ] + ["step"]


def test_changed_graph_byte_is_refused(folder):
    path = folder / "fused.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        mf.ManifestError,
        match=r"^fused\.onnx does not match its sha256 in manifest\.json \(expected [0-9a-f]{64}, "
        r"file has [0-9a-f]{64}\): the folder was modified after export$",
    ):
        runtime.load(folder)


def test_missing_file_is_refused(folder):
    (folder / "state_stage.onnx").unlink()
    with pytest.raises(
        mf.ManifestError, match=r"^state_stage\.onnx is listed in manifest\.json but missing from "
    ):
        runtime.load(folder)


def test_unknown_format_version_is_refused_before_hashes(folder):
    edit_manifest(folder, lambda raw: raw.update(format_version=99))
    (folder / "fused.onnx").unlink()  # the version is checked first
    with pytest.raises(
        mf.ManifestError,
        match=r"manifest\.json: format_version 99 is not supported by this runtime "
        r"\(supported: \[1\]\); upgrade hyperadam or re-export$",
    ):
        runtime.load(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw.update(format="other"), r"format must be 'hyperadam\.exported-optimizer'"),
        (lambda raw: raw.update(method="adam"), r"method must be one of \['dm', 'hyperadam', "),
        (lambda raw: raw.update(config={"num_candidates": 19}), r"state layout .* differs from"),
        (lambda raw: raw["graphs"]["fused"].update(file="state_stage.onnx"), r"graphs .* do not"),
        (lambda raw: raw.update(default_lr=-1), r"default_lr must be a finite number > 0, got -1"),
        (lambda raw: raw.update(ir_version=14), r"need opset >= 18 and IR version <= 13"),
        (lambda raw: raw["files"].update({"../x": "0"}), r"file name '\.\./x' is not a plain name"),
        (lambda raw: raw.pop("state"), r"malformed manifest \(KeyError: 'state'\)"),
    ],
    ids=["format", "method", "config", "graph-file", "lr", "ir", "path", "missing-key"],
)
def test_inconsistent_manifest_is_refused(folder, change, message):
    edit_manifest(folder, change)
    with pytest.raises(mf.ManifestError, match=message):
        mf.load_manifest(folder)


def test_not_a_folder_of_an_exported_optimizer(tmp_path):
    with pytest.raises(mf.ManifestError, match=r"has no manifest\.json: not an exported optimizer"):
        mf.load_manifest(tmp_path)
    (tmp_path / mf.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(mf.ManifestError, match=r"manifest\.json is not valid JSON"):
        mf.load_manifest(tmp_path)


def test_an_edited_default_lr_is_refused_when_the_manifest_is_pinned(folder):
    """Nothing in the folder can vouch for manifest.json: a consistent edit (0.005 → 0.5, a 100×
    larger step) passes the folder's own checks, so the digest comes from outside."""
    pinned = mf.sha256_file(folder / mf.MANIFEST_FILE)
    assert runtime.load(folder, sha256=pinned).manifest.default_lr == 0.005
    edit_manifest(folder, lambda raw: raw.update(default_lr=0.5))
    edited = mf.sha256_file(folder / mf.MANIFEST_FILE)
    with pytest.raises(
        mf.ManifestError,
        match=rf"manifest\.json has sha256 {edited}, expected {pinned}: the manifest was modified "
        r"or this is another exported optimizer$",
    ):
        runtime.load(folder, sha256=pinned)


def test_theta_is_required(folder):
    edit_manifest(folder, lambda raw: raw["files"].pop(mf.THETA_FILE))
    (folder / mf.THETA_FILE).unlink()
    with pytest.raises(
        mf.ManifestError, match=r"manifest\.json: theta\.npz has no sha256 in 'files' \(θ is req"
    ):
        runtime.load(folder)


def test_every_graph_the_manifest_names_is_required(folder):
    edit_manifest(folder, lambda raw: raw["files"].pop(mf.GRAPH_FILES[mf.UPDATE_STAGE]))
    (folder / mf.GRAPH_FILES[mf.UPDATE_STAGE]).unlink()
    with pytest.raises(
        mf.ManifestError,
        match=r"graph 'update_stage' file update_stage\.onnx has no sha256 in 'files'",
    ):
        runtime.load(folder)


@pytest.mark.parametrize("stray", ["extra.onnx", ".hidden", "sub"])
def test_files_the_manifest_does_not_list_are_refused(folder, stray):
    if stray == "sub":
        (folder / stray).mkdir()
    else:
        (folder / stray).write_bytes(b"not listed")
    with pytest.raises(
        mf.ManifestError, match=rf"holds files that manifest\.json does not list: {stray}$"
    ):
        runtime.load(folder)
