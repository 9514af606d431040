"""The README's commands, the docs' examples and links, the CI script, the CLI and the benchmarks' small modes."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README_MAX_LINES = 250


def readme_commands():
    return re.findall(r"^```(?:bash|sh)\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.M | re.S)


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_test_command():
    demo, tests = readme_commands()[:2]
    assert "pip install" in demo and demo.rstrip().endswith("laray sweep")
    assert "pip install" in tests and tests.rstrip().endswith("pytest")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert tests in ci_lines


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "laray.cli.main", "--help"], capture_output=True, text=True, check=True)
    assert "usage: laray" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "laray.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("laray ")


def test_python_dash_m_laray_and_the_public_api():
    out = subprocess.run([sys.executable, "-m", "laray", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: laray")
    probe = (
        "import sys, laray; light = not {'torch', 'ray'} & set(sys.modules); "
        "[getattr(laray, name) for name in laray.__all__]; print(light, sorted(dir(laray)) == sorted(laray.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]  # import laray costs no torch or Ray; every public name resolves


def _commands(parser, path=("laray",)):
    """(command path, its parser) for the CLI and every sub-command, however deep."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def test_every_option_of_every_command_has_help_with_its_default():
    import argparse

    from laray.cli.main import build_parser

    missing = []
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            flag = action.nargs == 0  # store_true and --x/--no-x: off unless given
            if not action.help:
                missing.append(f"{name}: no help")
            elif action.option_strings and not (flag or action.required or "default" in action.help):
                missing.append(f"{name}: help names no default")
    assert not missing, "\n".join(missing)


def test_wheel_holds_the_bundled_spaces_and_a_plain_install_finds_them(tmp_path):
    import shutil
    import zipfile

    source = tmp_path / "source"  # built from a copy: a build leaves build/ and *.egg-info beside the sources
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "runs", ".pytest_cache"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("laray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"laray/search_spaces/demo.yaml", "laray/search_spaces/default.yaml"} <= set(names)
    site = tmp_path / "site"  # a plain (non-editable) install of the wheel alone, ahead of the editable one
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import laray, sys; from laray.settings.space import load_space; from laray.cli.main import main; "
        "print(laray.__file__); print(load_space('demo').source); main(['sweep', '--help'])"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    module, space = done.stdout.splitlines()[:2]
    assert module.startswith(str(site)) and space == str(site / "laray" / "search_spaces" / "demo.yaml")
    assert "--confirm-seeds" in done.stdout


def test_la_step_benchmark_quick_mode_prints_measured_figures():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "la_step.py"), "--quick", "--steps", "3", "--direct-steps", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    speedup = float(re.search(r"speed-up, amortised: (\d+)x", out).group(1))
    assert speedup > 1  # laray's step must at least beat the per-batch refit at any size
    rows = re.findall(r"^\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(-?\d+)", out, flags=re.M)
    assert [int(r[0].replace(",", "")) for r in rows] == [500, 1000, 2000]
    assert all(float(r[1]) > 0 for r in rows)


def test_readme_and_docs_python_examples_run():
    # Blocks fenced as "python no-run" need the user's own files and are not run.
    ran = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in re.findall(r"^```python\n(.+?)```", page.read_text(), flags=re.M | re.S):
            exec(compile(block, str(page.relative_to(ROOT)), "exec"), {})
            ran.append(page.name)
    assert ran  # the examples are found where they live (docs/method.md holds the method's)


def _prose_lines(text):
    """The lines of a markdown text outside its fenced code blocks (fences may be indented, as in lists)."""
    fence = None
    for line in text.splitlines():
        marker = re.match(r"\s*(```|~~~)", line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            yield line


def _github_slug(heading):
    """GitHub's anchor for a heading: its rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page):
    seen, anchors = {}, set()
    for line in _prose_lines(page.read_text()):
        heading = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if heading:
            slug = _github_slug(heading.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")  # repeats get -1, -2, ...
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page):
    """Targets of the page's inline links and images, outside code blocks and code spans."""
    for line in _prose_lines(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)
        yield from re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)


def test_every_relative_link_in_the_readme_changelog_and_docs_resolves_and_the_readme_stays_short():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    pages = [readme, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
    checked, broken = 0, []
    for page in pages:
        where = page.relative_to(ROOT)
        assert "../shared" not in page.read_text(), f"{where} points at the private shared folder"
        for target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto: ...: not relative
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_relative_to(ROOT) or not file.exists():
                broken.append(f"{where}: {target}: no such file in the repository")
            elif file == ROOT / "shared" or (ROOT / "shared") in file.parents:
                broken.append(f"{where}: {target}: the private shared folder")
            elif anchor and (file.suffix != ".md" or anchor not in _anchors(file)):
                broken.append(f"{where}: {target}: no heading with that anchor")
    assert checked and not broken, "\n".join(broken)


def test_step_memory_benchmark_quick_mode_prints_measured_figures():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_memory.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["2,000", "8,000"], out
    for row in rows:
        plain_mb, laray_mb, plain_ms, laray_ms, gap = (float(v) for v in row[2:])
        assert plain_ms > 0 and laray_ms > 0 and plain_mb >= 0 and laray_mb >= 0
        assert gap < 1e-4  # the two ways compute the same loss


def test_eval_restarts_benchmark_quick_mode_prints_measured_figures():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "eval_restarts.py"),
            "--quick",
            "--restarts",
            "1",
            "20",
            "--seeds",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    (row,) = [line.split() for line in out.splitlines() if line.startswith("synthetic")]
    for cell, spread in ((row[1], row[2]), (row[4], row[5])):  # "lo-hi", "(hi - lo)", then seconds
        lo, hi = (float(v) for v in cell.split("-"))
        assert 0 < lo <= hi <= 1 and float(spread.strip("()")) == pytest.approx(hi - lo, abs=1.5e-3)


def _paper_model_output() -> str:
    """What `python benchmarks/paper_model.py` prints, as the page quotes it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paper_model.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def test_paper_model_reproduces_the_totals_on_the_benchmarks_page():
    out = _paper_model_output()
    assert out.startswith("PROJECTION")
    (total,) = [line.split()[1:] for line in out.splitlines() if line.startswith("total")]
    page = (DOCS / "benchmarks.md").read_text()  # "A DF20 sweep on paper"
    row = re.search(r"^\| \*\*search and confirmation\*\* \| (.+) \|$", page, flags=re.M).group(1)
    assert [f"{float(v):.1f}" for v in total] == [c.strip(" *") for c in row.split("|")]


def _paper_model(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("paper_model")


def test_paper_model_stage1_over_workers_against_a_hand_computation(monkeypatch):
    pm = _paper_model(monkeypatch)
    params = pm.autoencoder_parameters()
    assert params == 14_723_136 + 14_721_603  # vgg16_bn's encoder and decoder, as torch counted them
    grad = 4 * params  # float32 gradients: 117,778,956 bytes
    for gpu in pm.PEAKS:  # one worker: today's single-GPU stage 1, no all-reduce
        s, one = pm.model(gpu, 20), pm.stage1_step(gpu, 1, grad)
        assert one["all-reduce"] == 0 and one["overlapped"] == one["no overlap"] == pytest.approx(one["compute"])
        for overlap in (True, False):
            assert pm.stage1_seconds(s, one, overlap) == pytest.approx(s["stage 1"], rel=1e-12)
    # 4 A10Gs by hand: 16 images a worker x 184 GFLOP at 28 TFLOP/s; a ring all-reduce moves 2(4-1)/4 of the
    # gradient bytes through each GPU's PCIe link at 40 % of 31.5 GB/s
    compute, comm = 16 * 184e9 / 28e12, 1.5 * 117_778_956 / 12.6e9
    assert (compute, comm) == (pytest.approx(0.105143, rel=1e-5), pytest.approx(0.0140213, rel=1e-5))
    four = pm.stage1_step("A10G", 4, grad)
    assert four["compute"] == pytest.approx(compute) and four["all-reduce"] == pytest.approx(comm)
    assert four["overlapped"] == pytest.approx(compute)  # 14 ms hidden behind 70 ms of backward
    assert four["no overlap"] == pytest.approx(compute + comm)
    s = pm.model("A10G", 20)
    by_hand = 10 * (276_000 / 64 * (compute + comm) + s["encode"] + s["eval k-means"]) + s["raw baseline"]
    assert pm.stage1_seconds(s, four, overlap=False) == pytest.approx(by_hand + s["eval k-means"])
    # a link too slow to hide it (5 % of PCIe: 112 ms > 70 ms): forward + the all-reduce
    slow = pm.stage1_step("A10G", 4, grad, link_fraction=0.05)
    assert slow["overlapped"] == pytest.approx(compute / 3 + 1.5 * 117_778_956 / (0.05 * 31.5e9))
    # the confirmation's 5 seeds on 4 A10Gs: 2 GPUs a seed (3 rounds) beats a GPU each (2) and all 4 each (5)
    over = {w: pm.stage1_seconds(s, pm.stage1_step("A10G", w, grad)) for w in range(1, 5)}
    assert pm.confirmation_stage1(over, 4) == (3 * over[2], 2) and 3 * over[2] < min(2 * over[1], 5 * over[4])
    h = pm.sweep_hours(s, 4, stage1_over=over)
    assert h["stage 1"] == pytest.approx(over[4] / 3600) and h["confirm stage 1"] == pytest.approx(3 * over[2] / 3600)
    assert h["trials"] == pm.sweep_hours(s, 4)["trials"]


def test_paper_model_stage1_over_all_gpus_matches_the_benchmarks_page():
    out = _paper_model_output()
    assert "STAGE 1 OVER ALL GPUS (Ray Train, DDP): PROJECTION" in out
    printed = {
        line[:34].strip(): line[34:].split() for line in out.splitlines() if line.startswith(("before:", "after:"))
    }
    page = (DOCS / "benchmarks.md").read_text()  # "Stage 1 over all GPUs (DDP)"
    rows = re.findall(r"^\| (A10G|H100 SXM) × (\d) \| (.+) \|$", page, flags=re.M)
    assert [(gpu, n) for gpu, n, _ in rows] == [(g, n) for g in ("A10G", "H100 SXM") for n in "148"]
    for column, (_, _, row) in enumerate(rows):
        cells = [c.replace("*", "").strip() for c in row.split("|")]
        assert cells[0] == printed["before: stage 1 on one GPU"][column]
        assert cells[2] == printed["before: search"][column]
        assert cells[3].split()[0] == printed["after: stage 1 over all, overlap"][column]
        assert cells[3].split()[1] == f"({printed['after: stage 1, no overlap'][column]})"
        assert cells[5] == printed["after: search"][column]
        assert cells[7].split()[2] == printed["after: search and confirmation"][column]


def test_data_cache_benchmark_quick_mode_prints_measured_figures():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "data_cache.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert re.search(r"first pass, decode .* ([\d.]+) s\s+(\d+) images/s", out)
    epochs = re.findall(r"epoch from cache, .*?([\d.]+)x faster than decoding", out)
    assert len(epochs) == 3 and all(float(x) > 0 for x in epochs)


def test_train_throughput_benchmark_quick_mode_prints_measured_figures():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = re.findall(
        r"^demo \(digits\)\s+(autoencoder|local aggregation)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, flags=re.M
    )
    assert [r[0] for r in rows] == ["autoencoder", "local aggregation"]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)  # images/s and FLOPs per image measured


@pytest.mark.slow  # in -m slow since the default suite passed 15 min (docs/testing.md)
def test_sweep_overhead_benchmark_quick_mode_prints_measured_figures(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LARAY_CACHE_DIR"] = str(tmp_path / "cache")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep_overhead.py"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    assert re.search(r"stage 1 .* and its baselines: ([\d.]+) s", out)
    row = re.search(r"^\s+1\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)%", out, flags=re.M)
    assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0
    assert re.search(r"saves 7 x ([\d.]+) s = ([\d.]+) s", out)


def test_heap_growth_benchmark_small_size_prints_measured_figures():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "heap_growth.py"),
            "--n",
            "3000",
            "--iters",
            "2",
            "--steps",
            "2",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = re.findall(
        r"^(k-means|LA steps), .*?\s+1\s+(\d+)\s+(\d+)\s+([+-]\d+)\s+(\d+)\s+(\d+)\s+([+-]\d+)$", out, flags=re.M
    )
    assert [r[0] for r in rows] == ["k-means", "k-means", "LA steps"], out
    for row in rows:  # growth = after - before, to the rounding of each
        rss_before, rss_after, rss_growth, anon_before, anon_after, anon_growth = (int(v) for v in row[1:])
        assert abs(rss_after - rss_before - rss_growth) <= 1 and abs(anon_after - anon_before - anon_growth) <= 1
        assert 0 < anon_before <= rss_before
    assert len(re.findall(r"^  median\s+[+-]\d+\s+[+-]\d+$", out, flags=re.M)) == 3, out


def test_photo_recipe_benchmark_prints_a_table_row_over_seeds(tmp_path):
    from conftest import write_digit_folder

    photos = write_digit_folder(tmp_path / "photos", 30, size=40)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "autoencoder: {width: 0.125, image_size: 32, epochs: 1, batch_size: 16}\n"
        "la: {epochs: 1, batch_size: 16, k_neighbours: 8, n_centroids: 5, clustering_repeats: 1}\n"
    )
    env = {**os.environ, "LARAY_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "photo_recipe.py"),
            "--data",
            str(photos),
            "--config",
            str(config),
            "--seeds",
            "0",
            "1",
            "--jobs",
            "2",
            "--set",
            "la.grey=0.5",
            "--workdir",
            str(tmp_path / "work"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    seeds = re.findall(r"^  seed (\d): purity (0\.\d{3}) held-out (0\.\d{3})  raw pixels (0\.\d{3})", out, flags=re.M)
    assert sorted(s[0] for s in seeds) == ["0", "1"]
    number = r"(0\.\d{3}) ± (0\.\d{3})"
    row = re.search(
        rf"^\| la grey 0\.5 \| {number} \| {number} \| {number} \| {number} \| (-?\d\.\d{{3}}) ± ", out, flags=re.M
    )
    assert row, out
    purities = [float(s[1]) for s in seeds]
    assert float(row.group(1)) == pytest.approx(sum(purities) / 2, abs=1e-3)  # the mean of the seeds' lines
    raw = [float(s[3]) for s in seeds]
    assert float(row.group(9)) == pytest.approx((sum(purities) - sum(raw)) / 2, abs=2e-3)  # the margin's mean
    metrics = json.loads((tmp_path / "work" / "seed1" / "metrics.json").read_text())
    assert metrics["config"]["la"]["grey"] == 0.5 and metrics["config"]["autoencoder"]["width"] == 0.125
