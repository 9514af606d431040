"""One training run of both stages: the stages as plain functions (stages), a run and the files it leaves
(run), and trained auto-encoders kept per data and settings (store). No Ray here."""
