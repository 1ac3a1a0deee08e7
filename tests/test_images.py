"""``onnxws data``: image folders to evaluation arrays, preprocessing worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import onnxws.images as images
from onnxws.cli import app
from onnxws.errors import InputError
from onnxws.images import Preprocessing, build_npz, find_images, preprocessing

runner = CliRunner()
COLOUR = (128, 64, 32)


def solid(path, size=(400, 300), colour=COLOUR):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def classes_folder(tmp_path):
    for cls in ("dog", "cat"):
        for i in range(2):
            solid(tmp_path / "set" / cls / f"photo{i}_view{i}.png")
    solid(tmp_path / "set" / "cat" / "photo0_view1.png")
    return tmp_path / "set"


def test_imagenet_preset_by_hand(tmp_path):
    solid(tmp_path / "a.png", size=(400, 300))  # short side 300 -> 256, long 341; centre 224 crop
    x = preprocessing("imagenet").apply(tmp_path / "a.png")
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    expected = (np.array(COLOUR) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[:, 100, 100], expected, rtol=1e-5)
    raw = Preprocessing(layout="nhwc", dtype="uint8").apply(tmp_path / "a.png")
    assert raw.shape == (224, 224, 3) and raw.dtype == np.uint8 and tuple(raw[5, 5]) == COLOUR


def test_the_crop_is_centred_as_torchvision_does(tmp_path):
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, :200] = 255  # left half white
    Image.fromarray(img).save(tmp_path / "half.png")
    x = Preprocessing(size=300, crop=100, dtype="uint8", layout="nhwc").apply(tmp_path / "half.png")
    # no resize (short side already 300); the 100-wide centre crop spans columns 150..249: half white, half black
    assert (x[:, :50] == 255).all() and (x[:, 50:] == 0).all()


def test_class_folders_give_labels_and_groups(classes_folder, tmp_path):
    found = find_images(classes_folder, group_by=r"photo(\d)")
    assert found.classes == ["cat", "dog"] and found.mapping_from_folders
    assert found.labels == [0, 0, 0, 1, 1]
    assert found.groups == [0, 0, 1, 0, 1]  # photo0, photo0 (another view), photo1, ...
    classes = tmp_path / "classes.txt"
    classes.write_text("bird\ndog\ncat\n")
    found = find_images(classes_folder, classes)
    assert found.labels == [1, 1, 2, 2, 2] and not found.mapping_from_folders


def test_the_cli_writes_the_npz_and_the_mapping(classes_folder, tmp_path):
    out = tmp_path / "new" / "eval.npz"
    result = runner.invoke(app, ["data", str(classes_folder), "-o", str(out), "--crop", "64", "--size", "80"])
    assert result.exit_code == 0, result.output
    with np.load(out) as npz:
        assert npz["x"].shape == (5, 3, 64, 64) and list(npz["y"]) == [0, 0, 0, 1, 1]
    assert (tmp_path / "new" / "eval.classes.txt").read_text() == "cat\ndog\n"
    assert "0=cat, 1=dog" in " ".join(result.output.split())
    again = runner.invoke(app, ["data", str(classes_folder), "-o", str(out), "--json"])
    assert again.exit_code == 1 and "--force" in json.loads(again.stdout)["error"]


def test_a_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        solid(tmp_path / "flat" / f"{i}.jpg")
    summary = build_npz(tmp_path / "flat", tmp_path / "f.npz", Preprocessing(size=32, crop=32), input_name="image")
    assert summary["classes"] is None
    with np.load(tmp_path / "f.npz") as npz:
        assert sorted(npz.files) == ["image"]


def test_bad_folders_are_named(tmp_path, monkeypatch):
    solid(tmp_path / "mixed" / "top.png")
    solid(tmp_path / "mixed" / "cls" / "a.png")
    with pytest.raises(InputError, match="both at its top level and in subfolders"):
        find_images(tmp_path / "mixed")
    (tmp_path / "broken" / "c").mkdir(parents=True)
    (tmp_path / "broken" / "c" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.jpg could not be read"):
        build_npz(tmp_path / "broken", tmp_path / "b.npz", Preprocessing())
    with pytest.raises(InputError, match="does not match"):
        find_images(tmp_path / "mixed" / "cls", group_by="photo")
    monkeypatch.setattr(images, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match="more than the"):
        build_npz(tmp_path / "mixed" / "cls", tmp_path / "m.npz", Preprocessing())
    assert not (tmp_path / "m.npz").exists() and not (tmp_path / "b.npz").exists()
