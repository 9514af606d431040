"""`laray data check`: counts, sizes, bad files, exit codes, JSON; on small images made here."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from laray.cli.main import main


def _image(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def clean(tmp_path):
    """amanita: 3 images 32x24; boletus: 2 images 40x30."""
    root = tmp_path / "photos"
    for i in range(3):
        _image(root / "amanita" / f"a{i}.png", 32, 24, seed=i)
    for i in range(2):
        _image(root / "boletus" / f"b{i}.jpg", 40, 30, seed=10 + i)
    return root


@pytest.fixture
def with_bad(clean):
    (clean / "amanita" / "empty.png").write_bytes(b"")
    (clean / "boletus" / "notes.png").write_text("not a picture")
    return clean


def check(capsys, tmp_path, *args):
    """Run `laray data check` in-process; (exit code, stdout, stderr)."""
    code = main(["data", "check", *map(str, args), "--cache-dir", str(tmp_path / "cache"), "--workers", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("laray: error:")]


def test_clean_folder_prints_counts_per_label_and_sizes(clean, tmp_path, capsys):
    code, out, err = check(capsys, tmp_path, clean)
    assert code == 0 and not error_lines(err)
    assert "usable" in out and "5 images loaded, 0 bad file(s) skipped, 2 labels" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    assert rows["amanita"] == ["3"] and rows["boletus"] == ["2"] and rows["total"] == ["5"]
    assert rows["width"] == ["32", "32", "40"] and rows["height"] == ["24", "24", "30"]
    assert "bad files" not in out
    assert "5 images loaded" in err  # laray's INFO line reaches stderr


def test_bad_files_are_listed_and_strict_fails_with_one_line(with_bad, tmp_path, capsys):
    code, out, err = check(capsys, tmp_path, with_bad)
    assert code == 0 and not error_lines(err)
    table = out[out.index("bad files (2)") :]
    assert "empty.png" in table and "empty file (0 bytes)" in table
    assert "notes.png" in table and "not an image" in table

    code, out, err = check(capsys, tmp_path, with_bad, "--strict")
    assert code == 1
    assert "bad files (2)" in out  # the report still prints before the error
    assert error_lines(err) == [f"laray: error: 2 bad file(s) in {with_bad} (--strict)"]


def test_strict_failure_from_a_real_process(with_bad, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "laray.cli.main",
            "data",
            "check",
            str(with_bad),
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == f"laray: error: 2 bad file(s) in {with_bad} (--strict)"
    assert all(line.startswith("laray") for line in proc.stderr.splitlines())  # log lines and the error only
    assert "notes.png" in proc.stdout


def test_empty_folder_is_unusable_with_a_one_line_reason(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = check(capsys, tmp_path, tmp_path / "empty", "--json")
    assert code == 1
    assert err.strip() == error_lines(err)[0] and "no image files" in err  # one line, nothing else
    assert json.loads(out)["usable"] is False


def test_nonexistent_spec_fails(tmp_path, capsys):
    code, out, err = check(capsys, tmp_path, tmp_path / "nowhere")
    assert code == 1 and len(error_lines(err)) == 1 and "nowhere" in error_lines(err)[0]
    assert "Traceback" not in err


def test_csv_without_its_path_column_names_the_column(clean, tmp_path, capsys):
    csv = tmp_path / "meta.csv"
    csv.write_text("file,species\namanita/a0.png,amanita\n")
    code, out, err = check(capsys, tmp_path, csv)
    assert code == 1 and len(error_lines(err)) == 1 and "'image_path'" in error_lines(err)[0]


def test_csv_with_image_root_and_a_missing_file(clean, tmp_path, capsys):
    csv = tmp_path / "meta.csv"
    csv.write_text("path,genus\namanita/a0.png,Amanita\nboletus/b0.jpg,Boletus\ngone.png,Amanita\n")
    code, out, err = check(
        capsys, tmp_path, csv, "--path-column", "path", "--label-column", "genus", "--image-root", clean, "--json"
    )
    report = json.loads(out)
    assert code == 0 and report["per_label"] == {"Amanita": 1, "Boletus": 1}
    assert report["bad_files"] == [{"path": str(clean / "gone.png"), "reason": "file not found (CSV line 4)"}]


def test_json_report_fields_and_counts(with_bad, tmp_path, capsys):
    code, out, err = check(capsys, tmp_path, with_bad, "--json")
    report = json.loads(out)  # stdout holds the JSON and nothing else
    assert code == 0
    assert report["spec"] == str(with_bad) and report["usable"] is True and report["reason"] is None
    assert report["labelled"] is True and report["n_images"] == 5 and report["n_skipped"] == 2
    assert report["per_label"] == {"amanita": 3, "boletus": 2}
    assert report["image_sizes"] == {
        "width": {"min": 32, "median": 32.0, "max": 40},
        "height": {"min": 24, "median": 24.0, "max": 30},
    }
    assert sorted(b["path"].rsplit("/", 1)[1] for b in report["bad_files"]) == ["empty.png", "notes.png"]
    assert "INFO" not in err  # --json: warnings and errors only on stderr


def test_all_files_bad_lists_every_one(tmp_path, capsys):
    for i in range(3):
        path = tmp_path / "broken" / "x" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG broken")
    code, out, err = check(capsys, tmp_path, tmp_path / "broken", "--json")
    report = json.loads(out)
    assert code == 1 and report["usable"] is False and "no usable image" in report["reason"]
    assert report["n_skipped"] == 3 and len(report["bad_files"]) == 3


def test_flat_folder_is_unlabelled(tmp_path, capsys):
    for i in range(2):
        _image(tmp_path / "flat" / f"{i}.png", 20, 20, seed=i)
    code, out, err = check(capsys, tmp_path, tmp_path / "flat", "--json")
    report = json.loads(out)
    assert code == 0 and report["labelled"] is False and report["per_label"] == {} and report["n_images"] == 2


def test_digits(tmp_path, capsys):
    code, out, err = check(capsys, tmp_path, "digits", "--json")
    report = json.loads(out)
    assert code == 0 and report["n_images"] == 1797 and len(report["per_label"]) == 10
    assert sum(report["per_label"].values()) == 1797 and report["image_sizes"]["width"]["max"] == 8


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", "--help"])
    assert exit_info.value.code == 0 and "SPEC" in capsys.readouterr().out
    assert main(["data"]) == 0 and "check" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", "digits", "--image-size", "0"])
    assert exit_info.value.code == 2
