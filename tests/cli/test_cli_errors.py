"""What the CLI prints when something fails: one line that names the cause, or a bug's traceback."""

import logging
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from laray.cli import main as cli
from laray.errors import DataWarning, LarayError


def ray_task_error(cause: Exception):
    """The exception ray.get raises for an error inside a task: Ray's wrapper, of the cause's class too."""
    from ray.exceptions import RayTaskError

    try:
        raise cause
    except type(cause) as raised:
        return RayTaskError("_stage1_task", "Traceback (most recent call last): ...", raised).as_instanceof_cause()


def test_an_error_inside_a_ray_task_is_one_line_with_its_cause():
    bug = ray_task_error(ValueError("Number of labels is 6. Valid values are 2 to n_samples - 1 (inclusive)"))
    assert cli._one_line(bug) == (
        "ValueError in a Ray task: Number of labels is 6. Valid values are 2 to "
        "n_samples - 1 (inclusive) (--debug shows the traceback)"
    )
    expected = ray_task_error(LarayError("no space left on the device of /x while writing the checkpoint"))
    assert cli._one_line(expected) == "no space left on the device of /x while writing the checkpoint (in a Ray task)"
    assert cli._raised_in(ValueError("plain")) is None  # not from Ray: a bug shows its traceback


def test_a_data_set_smaller_than_its_clusters_is_refused_before_ray(tmp_path, capsys):
    """A sweep over 6 loose photos once failed inside stage 1's Ray task with sklearn's message only."""
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"photo{i}.png")
    assert cli.main(["sweep", "--data", str(tmp_path), "--storage", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "laray: error: 6 images are too few: unlabelled data are scored with k-means at K = 10, "
        "which needs at least 11 images"
    )
    assert not (tmp_path / "results").exists()  # refused before anything was created
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "6 images are too few" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_skipped_files_show_as_one_log_line_without_python_source(capsys):
    cli._configure_logging(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = cli._show_warning
        warnings.warn("photos: skipped 2 of 9 file(s) (all of them in /c/skipped.txt):\n  a.jpg: empty", DataWarning)
    err = capsys.readouterr().err
    assert err.startswith("laray.data.dataset: WARNING: photos: skipped 2 of 9 file(s)") and "warnings.warn" not in err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["sweep", "--num-samples", "-3"], "argument --num-samples: must be at least 1, got -3"),
        (["sweep", "--precision", "x"], "argument --precision: invalid choice: 'x'"),
        (["train", "--out", "o", "--la-epochs", "many"], "argument --la-epochs"),
        (["frob"], "argument COMMAND: invalid choice: 'frob'"),
    ],
)
def test_usage_errors_are_one_line_naming_the_value_and_the_help_to_read(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    command = "laray" if argv[0] == "frob" else f"laray {argv[0]}"
    assert err.count("\n") == 1 and err.startswith(f"{command}: error: {named}"), err
    assert err.rstrip().endswith(f"(see {command} --help)")


def test_analyze_of_a_folder_that_is_no_sweep_fails_before_torch_with_what_to_give(tmp_path):
    (tmp_path / "demo-1" / "trial").mkdir(parents=True)
    (tmp_path / "demo-1" / "best.json").write_text("{}")
    probe = (
        "import sys; from laray.cli.main import main; "
        f"code = main(['analyze', {str(tmp_path)!r}]); print(code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["1", "False"], done.stderr
    assert done.stderr.count("\n") == 1
    assert f"{tmp_path} is no laray sweep (no trial folders with params.json)" in done.stderr
    assert "STORAGE/NAME" in done.stderr and "sweeps in it: demo-1" in done.stderr
