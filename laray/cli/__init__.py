"""The `laray` command: parses arguments, calls the library, turns expected failures into one line."""
