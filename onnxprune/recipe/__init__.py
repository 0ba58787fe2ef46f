"""One typed config shared by the CLI, the API, Olive and plans; the pass list; the pipeline."""
