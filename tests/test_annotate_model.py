"""``qpcell annotate-back --model``: predict a QuPath project's images, then write them back."""

from __future__ import annotations

import shutil

import numpy as np
import tifffile

from qpcell.synthetic import render_image

ANDREW = "AndrewZhang419__QuPath"  # QuPath 0.5.1 sample project; its images live elsewhere
IMAGES = ("MTA3-8_GPC3 (2)", "MTA3-3_GPC3")


def _project_with_images(qupath_samples, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(qupath_samples / ANDREW, root)
    images = tmp_path / "moved images"
    images.mkdir()
    for i, stem in enumerate(IMAGES):
        pixels, _, _ = render_image((96, 128), 3, rng=i)
        tifffile.imwrite(images / f"{stem}.svs", pixels, photometric="rgb")
    return root, images


def test_model_predicts_project_images_then_writes_them(cli, qupath_samples, tiny_model,
                                                         tmp_path):
    root, images = _project_with_images(qupath_samples, tmp_path)
    code, out, err = cli("annotate-back", "--model", tiny_model, root / "project.qpproj",
                         "--images", ",".join(f"{s}.svs" for s in IMAGES), "--image-root",
                         f"/Users/shuningliu/Downloads={images}", "--device", "cpu",
                         "--dry-run")
    assert code == 0, err
    predictions = root / "qpcell" / "predictions"
    for stem in IMAGES:
        assert (predictions / f"{stem}.geojson").is_file()
    assert "Would write (dry run)" in out and "MTA3-3_GPC3" in out
    assert not (root / "qpcell-backups").exists()
    # the user's project files are untouched by a dry run
    original = (qupath_samples / ANDREW / "project.qpproj").read_bytes()
    assert (root / "project.qpproj").read_bytes() == original


def test_model_with_missing_images_names_them(cli, qupath_samples, tiny_model, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(qupath_samples / ANDREW, root)
    code, out, err = cli("annotate-back", "--model", tiny_model, root, "--device", "cpu")
    assert code == 1
    assert "image file(s) not found" in err and "MTA3-8_GPC3 (2).svs" in err
    assert "--image-root" in err


def test_model_takes_only_the_project(cli, tiny_model, tmp_path):
    code, _, err = cli("annotate-back", "--model", tiny_model, tmp_path, tmp_path)
    assert code == 1 and "only the QuPath project" in err
    code, _, err = cli("annotate-back", tmp_path)
    assert code == 1 and "PREDICTIONS and PROJECT" in err


def test_predictions_of_a_tiff_named_svs_are_readable(tmp_path):
    from qpcell.io.slides import open_slide

    pixels, _, _ = render_image((40, 50), 2, rng=0)
    tifffile.imwrite(tmp_path / "a.svs", pixels, photometric="rgb")
    with open_slide(tmp_path / "a.svs") as slide:
        assert (slide.width, slide.height) == (50, 40)
        np.testing.assert_array_equal(slide.read(0, 0, 50, 40), pixels)
