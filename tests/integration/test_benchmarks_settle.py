"""benchmarks/settle_sim.py in a small mode: the two looks of a confirmation, simulated with laray's functions."""

from conftest import load_benchmark


def load_settle_sim():
    return load_benchmark("settle_sim")


def test_the_two_looks_by_their_edges():
    sim = load_settle_sim()
    # no spread to speak of: a margin of 0.05 is settled at the first look every time...
    assert sim.two_looks(0.05, 1e-4, first=5, repeats=50, seed=0) == (1.0, 0.0, 5.0)
    # ...and one below 0 never: no seeds are added for it, none says "better"
    assert sim.two_looks(-0.05, 0.01, first=5, repeats=50, seed=0) == (0.0, 0.0, 5.0)
    # a margin of 0 with a spread: some looks add seeds, and the rates are shares
    first, after, seeds = sim.two_looks(0.0, 0.036, first=5, repeats=400, seed=0)
    assert 0 <= first < 0.1 and 0 <= after < 0.1 and 5 < seeds <= 30


def test_the_table_prints_one_row_per_margin(capsys):
    load_settle_sim().main(["--margins", "0", "0.03", "--repeats", "100"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "paired sd 0.036, first look 5 seeds, 100 simulated confirmations each"
    rows = [line for line in lines if line.startswith("| +")]
    assert [row.split("|")[1].strip() for row in rows] == ["+0.000", "+0.030"]
    assert all(0 <= float(row.split("|")[4]) <= 1 for row in rows)
