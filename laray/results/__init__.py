"""Reading what runs and sweeps left on disk, without Ray: every trial scored (scores), pictures (plots),
`laray analyze` (report) and `laray predict` (predict)."""
