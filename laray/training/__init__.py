"""One training run of both stages: the stages as plain functions (stages), a run and the files it leaves
(run), trained auto-encoders kept per data and settings (store), and the lines inside a long epoch
(epoch_progress). No Ray here."""
