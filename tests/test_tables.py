"""Point tables: the readers, the dataset layouts, and every kind of bad line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qpcell.errors import QpcellError
from qpcell.io.tables import (
    find_class_names,
    import_tables,
    read_class_names,
    read_point_table,
    resolve_dataset,
)

ENDONUKE_COUNTS = {"stroma": 19683, "epithelium": 6085, "other": 299}  # data README, raw lines


def table(tmp_path: Path, text: str, name: str = "t.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def dataset(tmp_path: Path, tables: dict[str, str], *, size=(100, 80), classes=None,
            suffix: str = ".txt") -> Path:
    """A small EndoNuke-style dataset: images/<id>.png, labels/<id>.txt, classes.txt."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem, text in tables.items():
        Image.new("RGB", size).save(root / "images" / f"{stem}.png")
        (root / "labels" / f"{stem}{suffix}").write_text(text)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# --------------------------------------------------------------------------------------
# read_point_table
# --------------------------------------------------------------------------------------


def test_txt_with_ids_and_names(tmp_path: Path) -> None:
    path = table(tmp_path, "54 25 0\n98.5\t13 1\n\n# a comment\n142 175 2\n")
    xy, names = read_point_table(path)
    np.testing.assert_array_equal(xy, [[54, 25], [98.5, 13], [142, 175]])
    assert names == ["0", "1", "2"]
    xy, names = read_point_table(path, class_names=["stroma", "epithelium", "other"])
    assert names == ["stroma", "epithelium", "other"]


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    plain = table(tmp_path, "17,130,1\n95,156,3\n", "a.csv")
    xy, names = read_point_table(plain, class_names=["a", "b", "c", "d"])
    assert xy.tolist() == [[17, 130], [95, 156]] and names == ["b", "d"]
    header = table(tmp_path, "label,y,x,score\nTumor,130,17,0.9\n\"Stroma, dense\",156,95,1\n",
                   "b.csv")
    xy, names = read_point_table(header)
    assert xy.tolist() == [[17, 130], [95, 156]] and names == ["Tumor", "Stroma, dense"]


def test_auto_format(tmp_path: Path) -> None:
    assert read_point_table(table(tmp_path, "1,2,0\n", "a.txt"))[0].tolist() == [[1, 2]]
    assert read_point_table(table(tmp_path, "1 2 0\n", "b.txt"), fmt="txt")[1] == ["0"]
    with pytest.raises(QpcellError, match="format"):
        read_point_table(table(tmp_path, "1 2 0\n", "c.txt"), fmt="xlsx")


def test_names_and_ids_mixed(tmp_path: Path) -> None:
    path = table(tmp_path, "1 2 0\n3 4 stroma\n5 6 1.0\n")
    assert read_point_table(path, class_names=["stroma", "tumor"])[1] == ["stroma", "stroma",
                                                                          "tumor"]


def test_empty_table(tmp_path: Path) -> None:
    xy, names = read_point_table(table(tmp_path, ""))
    assert xy.shape == (0, 2) and names == []


@pytest.mark.parametrize("text,line,message", [
    ("1 2 0\n3 4\n", 2, "expected 3 columns"),
    ("1 2 0\n3 4 0 7\n", 2, "expected 3 columns"),
    ("1 2 0\nx 4 0\n", 2, "must be numbers"),
    ("1 2 0\n\n3 nan 0\n", 3, "NaN"),
    ("1 inf 0\n", 1, "NaN or infinite"),
    ("1 2 5\n", 1, "class index 5 is beyond the 3 classes"),
    ("1 2 -1\n", 1, "negative"),
    ("1 2 1.5\n", 1, "neither an integer id nor a name"),
    ("1 2 tumour\n", 1, "'tumour' is not one of the classes"),
])
def test_bad_lines_name_file_and_line(tmp_path: Path, text: str, line: int, message) -> None:
    path = table(tmp_path, text)
    with pytest.raises(QpcellError, match=message) as err:
        read_point_table(path, class_names=["a", "b", "c"])
    assert f"{path}:{line}" in str(err.value)


def test_empty_class_in_csv(tmp_path: Path) -> None:
    path = table(tmp_path, "1,2,0\n3,4,\n", "e.csv")
    with pytest.raises(QpcellError, match="empty class name") as err:
        read_point_table(path)
    assert f"{path}:2" in str(err.value)


def test_header_without_class_column(tmp_path: Path) -> None:
    with pytest.raises(QpcellError, match="no class column"):
        read_point_table(table(tmp_path, "x,y,score\n1,2,3\n", "h.csv"))


def test_not_text(tmp_path: Path) -> None:
    path = tmp_path / "b.txt"
    path.write_bytes(b"\xff\xfe\x00\x89")
    with pytest.raises(QpcellError, match="not a text"):
        read_point_table(path)
    with pytest.raises(QpcellError, match="not found"):
        read_point_table(tmp_path / "missing.txt")


def test_read_class_names(tmp_path: Path, endonuke: Path) -> None:
    assert read_class_names(endonuke / "classes.txt") == ["stroma", "epithelium", "other"]
    with pytest.raises(QpcellError, match="twice"):
        read_class_names(table(tmp_path, "a\nb\na\n", "classes.txt"))
    with pytest.raises(QpcellError, match="no class names"):
        read_class_names(table(tmp_path, "\n# nothing\n", "classes.txt"))


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


def test_endonuke_dataset(endonuke: Path) -> None:
    result = import_tables(endonuke)
    assert len(result) == 282
    assert result.class_source == str(endonuke / "classes.txt")
    assert [c.name for c in result.classes] == ["stroma", "epithelium", "other"]
    counts = result.counts()
    # the labels repeat 28 points exactly (same class and position): kept once, with a warning
    dropped = {k: ENDONUKE_COUNTS[k] - counts[k] for k in counts}
    assert dropped == {"stroma": 24, "epithelium": 4, "other": 0}
    dup_warnings = [w for w in result.warnings if "duplicate" in w]
    assert len(dup_warnings) == len(result.warnings) == 20
    assert all(w.startswith(str(endonuke / "labels")) for w in dup_warnings)
    assert result.images[0].name == "321"  # natural order of the names
    first = next(img for img in result if img.name == "1010")
    assert first.image == endonuke / "images" / "1010.png"
    assert first.metadata["table"] == str(endonuke / "labels" / "1010.txt")
    # points come grouped by class, in file order within a class
    raw = np.loadtxt(endonuke / "labels" / "1010.txt").reshape(-1, 3)
    order = np.argsort(raw[:, 2], kind="stable")
    np.testing.assert_array_equal(first.xy, raw[order, :2])
    np.testing.assert_array_equal(first.labels, raw[order, 2])


@pytest.mark.parametrize("subset", ["train", "test"])
def test_nucls_subsets(nucls: Path, subset: str) -> None:
    result = import_tables(nucls / subset)
    assert len(result) == (10 if subset == "train" else 5)
    assert result.class_source == str(nucls / "classes.txt")
    assert [c.name for c in result.classes] == ["tumor_any", "nonTIL_stromal", "sTIL",
                                                "other_nucleus"]
    assert result.images_dir == nucls / subset / "images"


def test_nucls_all_points(nucls: Path) -> None:
    total = sum(sum(import_tables(nucls / s).counts().values()) for s in ("train", "test"))
    assert total == 584  # data README
    labels_only = import_tables(nucls / "test" / "labels")  # pointing at the labels folder
    assert len(labels_only) == 5 and labels_only.images_dir == nucls / "test" / "images"


def test_nucls_root_asks_for_a_subset(nucls: Path) -> None:
    with pytest.raises(QpcellError, match="train/") as err:
        import_tables(nucls)
    assert "test/" in str(err.value)


def test_single_table_and_explicit_images(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n", "b": "3 4 1\n"})
    one = import_tables(root / "labels" / "b.txt", root / "images", class_names=["x", "y"])
    assert [i.name for i in one] == ["b"] and one[0].counts() == {"x": 0, "y": 1}


def test_classes_from_ids_or_names(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 10\n5 5 2\n", "b": "3 4 2\n"})
    result = import_tables(root)
    assert [c.name for c in result.classes] == ["2", "10"]  # numeric order
    assert result.class_source == "class ids"
    root2 = dataset(tmp_path / "n", {"a": "1 2 tumor\n", "b": "3 4 immune\n5 6 tumor\n"})
    result = import_tables(root2)
    assert [c.name for c in result.classes] == ["tumor", "immune"]  # first appearance


def test_explicit_class_names_beat_classes_txt(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n3 3 1\n"}, classes=["p", "q"])
    assert [c.name for c in import_tables(root).classes] == ["p", "q"]
    result = import_tables(root, class_names=["r", "s", "t"])
    assert [c.name for c in result.classes] == ["r", "s", "t"]
    assert result.class_source == "--classes"


def test_find_class_names(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n"}, classes=["p"])
    assert find_class_names(root, root / "labels") == root / "classes.txt"
    assert find_class_names(root / "labels", root / "labels") == root / "classes.txt"


def test_csv_dataset_and_format_choice(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1,2,0\n", "b": "3,4,1\n"}, suffix=".csv")
    assert len(import_tables(root, fmt="csv")) == 2
    with pytest.raises(QpcellError, match="holds no txt files"):
        import_tables(root, fmt="txt")


def test_mpp_is_recorded(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n"})
    assert import_tables(root, mpp=0.5)[0].mpp == 0.5
    with pytest.raises(QpcellError, match="not a positive"):
        import_tables(root, mpp=-1.0)


# --------------------------------------------------------------------------------------
# Bad datasets
# --------------------------------------------------------------------------------------


def test_missing_image_is_an_error(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n", "b": "1 2 0\n"})
    (root / "images" / "b.png").unlink()
    with pytest.raises(QpcellError, match=r"no image for 1 label table\(s\): b.txt"):
        import_tables(root)


def test_image_without_table_is_a_warning(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n"})
    Image.new("RGB", (5, 5)).save(root / "images" / "extra.png")
    result = import_tables(root)
    assert len(result) == 1
    assert any("extra.png" in w and "no label table" in w for w in result.warnings)


def test_out_of_image_points_skipped(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n100 5 0\n5 80 1\n99.9 79.9 1\n"}, size=(100, 80))
    result = import_tables(root)
    assert result[0].xy.tolist() == [[1, 2], [99.9, 79.9]]
    assert any("2 points outside the 100x80 image" in w for w in result.warnings)
    assert len(import_tables(root, check_bounds=False)[0]) == 4


def test_duplicates(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n1 2 0\n3 3 1\n"})
    result = import_tables(root)
    assert len(result[0]) == 2
    assert any("1 duplicate point" in w for w in result.warnings)
    root2 = dataset(tmp_path / "c", {"a": "1 2 0\n1 2 1\n"}, classes=["tumor", "stroma"])
    with pytest.raises(QpcellError, match="'tumor' and 'stroma'") as err:
        import_tables(root2)
    assert "a.txt" in str(err.value)


def test_label_beyond_classes_txt(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n3 4 2\n"}, classes=["tumor", "stroma"])
    with pytest.raises(QpcellError, match="class index 2 is beyond the 2 classes") as err:
        import_tables(root)
    assert f"{root / 'labels' / 'a.txt'}:2" in str(err.value)


def test_two_tables_for_one_image(tmp_path: Path) -> None:
    root = dataset(tmp_path, {"a": "1 2 0\n"})
    (root / "labels" / "a.csv").write_text("1,2,0\n")
    with pytest.raises(QpcellError, match="two tables for one image"):
        import_tables(root)


def test_nothing_to_import(tmp_path: Path) -> None:
    with pytest.raises(QpcellError, match="no such file"):
        import_tables(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QpcellError, match="no labels/ folder"):
        resolve_dataset(tmp_path / "empty")
    root = dataset(tmp_path, {"a": "1 2 0\n"})
    with pytest.raises(QpcellError, match="images folder not found"):
        import_tables(root, tmp_path / "nope")
