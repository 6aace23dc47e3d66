"""Shared fixtures: the CLI runner and the location of the real third-party data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qpcell.cli import main
from qpcell.train import TrainCallbacks

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$QPCELL_DATA`` or ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("QPCELL_DATA", REPO.parent / "shared" / "data"))


def samples_root() -> Path:
    """The genuine QuPath-written files in ``../shared/qupath-samples``."""
    return REPO.parent / "shared" / "qupath-samples"


def headless_qupath_root() -> Path:
    """``../shared/qupath-headless``: QuPath 0.5.1's core for tests (``setup --env`` first)."""
    return REPO.parent / "shared" / "qupath-headless"


def in_ci() -> bool:
    """True where the environment says CI (``CI=true``, as CI services and ``.ci/run`` set)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip with ``reason``; in CI fail instead, since there the real-QuPath tests must run."""
    if in_ci():
        pytest.fail(f"CI must run the real-QuPath tests, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_qupath():
    """The QuPath installation paquo uses (``PAQUO_QUPATH_DIR``); skips (fails in CI) without.

    ``scripts/test`` and ``.ci/run`` export it from ``../shared/qupath-headless/setup --env``.
    """
    from qpcell.io.paquo import find_qupath_installation

    found = find_qupath_installation()
    if not found.found:
        skip_or_fail_in_ci(
            f"no QuPath installation found ({found.detail}); install QuPath 0.4-0.6 and set "
            'PAQUO_QUPATH_DIR, or eval "$(../shared/qupath-headless/setup --env)"')
    return found


@pytest.fixture(scope="session")
def qupath_script_runner(real_qupath) -> Path:
    """``run-script`` of ``../shared/qupath-headless``: runs a QuPath Groovy script on a
    project image headless, as the script editor's "Run" does, then saves the image."""
    run = headless_qupath_root() / "run-script"
    if not run.is_file():
        skip_or_fail_in_ci(f"{run} not found (the headless QuPath of ../shared)")
    if not Path("/usr/share/groovy/lib").is_dir():
        skip_or_fail_in_ci("run-script needs Debian's groovy package (apt-get install groovy)")
    return run


@pytest.fixture
def endonuke() -> Path:
    root = data_root() / "endonuke"
    if not (root / "labels").is_dir():
        pytest.skip(f"EndoNuke data not found at {root} (set QPCELL_DATA)")
    return root


@pytest.fixture
def nucls() -> Path:
    root = data_root() / "nucls-example"
    if not root.is_dir():
        pytest.skip(f"NuCLS example not found at {root} (set QPCELL_DATA)")
    return root


@pytest.fixture
def qupath_samples() -> Path:
    root = samples_root()
    if not root.is_dir():
        pytest.skip(f"QuPath sample files not found at {root}")
    return root


@pytest.fixture
def cli(capsys):
    """Run ``qpcell ARGS``; return ``(exit_code, stdout, stderr)``."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


# Two steps of the paper's recipe: a model trained this little with batch normalisation
# (the fast recipe) has running statistics too raw to find anything.
TINY_TRAIN = ("--epochs", "1", "--max-steps", "2", "--patch-size", "64", "--stride", "64",
              "--model-mpp", "native", "--device", "cpu", "--recipe", "paper")


@pytest.fixture(scope="session")
def synthetic_project(tmp_path_factory) -> Path:
    """A GeoJSON project of three 96x96 synthetic mIHC images with three classes."""
    from qpcell.synthetic import write_synthetic_project

    root = tmp_path_factory.mktemp("project")
    write_synthetic_project(root, 3, (96, 96), 3, seed=5)
    return root


@pytest.fixture(scope="session")
def tiny_model(synthetic_project, tmp_path_factory) -> Path:
    """An S-DRDIN (base 4) trained for two steps on :func:`synthetic_project`."""
    out = tmp_path_factory.mktemp("model") / "m"
    with pytest.raises(SystemExit) as exc:
        main(["train", str(synthetic_project), "--out", str(out), "--base", "4", *TINY_TRAIN])
    assert exc.value.code == 0
    return out


class NoteTaker(TrainCallbacks):
    """Training callbacks that keep every note."""

    def __init__(self):
        self.notes: list[str] = []

    def on_note(self, text: str) -> None:
        self.notes.append(text)
