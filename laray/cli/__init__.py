"""The `laray` command: parses arguments, calls the library, prints its results, turns expected failures into one line.

main.py builds the parser and shows failures; options.py holds what several commands share; train.py, sweep.py,
results.py (analyze, predict) and data.py (data check, weights fetch) hold one command group each; tables.py formats
the tables a sweep prints at its end.
"""
