"""qpcell-detect.groovy's read-outs in real QuPath (the headless QuPath 0.5.1 core).

The script runs through ``../shared/qupath-headless/run-script`` on a project made by paquo;
``QPCELL`` is a stand-in for ``qpcell predict`` that writes its folder with qpcell's own
read-out writers (no model needed). Skipped where QuPath, Java or groovy are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qpcell.io.qupath import find_qupath_installation

REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO.parent / "shared" / "qupath-headless" / "run-script"
QUPATH = find_qupath_installation()
pytestmark = [
    pytest.mark.skipif(not QUPATH.found, reason=f"no QuPath found: {QUPATH.detail}"),
    pytest.mark.skipif(not RUN_SCRIPT.is_file() or shutil.which("groovy") is None
                       or not os.environ.get("JAVA_HOME"),
                       reason="needs ../shared/qupath-headless, groovy and JAVA_HOME"),
]

FAKE_PREDICT = r'''#!{python}
"""Stand-in for `qpcell predict`: cells from a seed, outputs by qpcell's own writers."""
import json, os, sys
from pathlib import Path
import numpy as np
from qpcell.io.geojson import read_geojson, write_detections
from qpcell.io.readouts import (ReadoutOptions, read_out, write_hotspots,
                                write_measurements_tsv)
from qpcell.points import CellClass, Detections
from qpcell.readouts import PositiveRule, qupath_measurements

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
regions = read_geojson(args[args.index("--regions-file") + 1]).regions
assert args[args.index("--positive-classes") + 1] == "Ki67+"
area = float(args[args.index("--hotspot-mm2") + 1])
out.mkdir(parents=True)
rng = np.random.default_rng(int(os.environ["FAKE_SEED"]))
n = 80
classes = (CellClass("Ki67+", (150, 80, 0)), CellClass("Ki67-", (0, 0, 200)))
xy = rng.uniform(20, 480, (n, 2))
labels = rng.integers(0, 2, n)
det = Detections(xy, labels, np.full(n, 0.9, np.float32), np.full((n, 2), 0.5, np.float32),
                 classes, mpp=0.5)
stem = Path(args[2]).stem
write_detections(out / f"{{stem}}.geojson", det)
res = read_out(xy, labels, ["Ki67+", "Ki67-"], image_size=(512, 512), regions=regions, mpp=0.5,
               options=ReadoutOptions(PositiveRule(("Ki67+",)), area, 5))
write_measurements_tsv(out / f"{{stem}}.measurements.tsv", res.regions)
write_hotspots(out / f"{{stem}}.hotspots.json", res.hotspots)
Path(os.environ["FAKE_EXPECTED"]).write_text(json.dumps(
    [qupath_measurements(r) for r in res.regions[1:]]))
'''


def test_detect_script_puts_readouts_and_hotspots_in_qupath(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject
    from shapely.geometry import MultiPoint, box

    image = tmp_path / "slide.tif"
    tifffile.imwrite(image, np.full((512, 512, 3), 230, np.uint8), photometric="rgb")
    tumour = QuPathPathClass("Tumor", color=(200, 0, 0))
    with QuPathProject(tmp_path / "qp", mode="x") as qp:
        qp.path_classes = [tumour]
        h = qp.add_image(image).hierarchy
        h.add_annotation(box(40, 40, 300, 300), path_class=tumour,
                         measurements={"My score": 7.0, "qpcell: stale": 1.0})
        h.add_annotation(box(320, 60, 480, 460))
        h.add_annotation(MultiPoint([(400, 30)]), path_class=tumour)
    qpproj = tmp_path / "qp" / "project.qpproj"
    (tmp_path / "qp" / "qpcell-model").mkdir()
    fake = tmp_path / "qpcell"
    fake.write_text(FAKE_PREDICT.format(python=sys.executable), encoding="utf-8")
    fake.chmod(0o755)
    expected = tmp_path / "expected.json"

    def run(seed: int) -> list:
        env = dict(os.environ, FAKE_SEED=str(seed), FAKE_EXPECTED=str(expected),
                   PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [str(RUN_SCRIPT), str(qpproj), "slide.tif", str(REPO / "groovy" /
                                                              "qpcell-detect.groovy"),
             f"QPCELL={fake}", "REGIONS=all", "POSITIVE_CLASSES=Ki67+", "HOTSPOT_MM2=0.005"],
            capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "read-outs on 2 annotation(s)" in proc.stdout
        with QuPathProject(qpproj, mode="r") as qp:
            (entry,) = qp.images
            return [(a.path_class.name if a.path_class else None, a.roi.bounds,
                     dict(a.measurements), a.name) for a in entry.hierarchy.annotations]

    for seed in (0, 1):  # the second run replaces the first one's figures
        annotations = run(seed)
        want = json.loads(expected.read_text())
        areas = sorted((a for a in annotations
                        if a[1][0] != a[1][2] and a[0] != "qpcell hotspot"),
                       key=lambda a: a[1][0])
        assert len(areas) == 2
        for (_, _, got, _), exp in zip(areas, want, strict=True):
            ours = {k: v for k, v in got.items() if k.startswith("qpcell: ")}
            assert ours.keys() == exp.keys()
            for k, v in exp.items():
                assert ours[k] == pytest.approx(v, rel=1e-6), k
            assert "qpcell: positive %" in ours
        assert areas[0][2]["My score"] == 7.0  # the user's measurement stays
        assert [a[2] for a in annotations if a[1][0] == a[1][2]] == [{}]  # the point
        hot = sorted(a[3] for a in annotations if a[0] == "qpcell hotspot")
        assert hot == ["qpcell Ki67+ density hotspot", "qpcell Ki67- density hotspot",
                       "qpcell positive % hotspot"]  # replaced, not added to
