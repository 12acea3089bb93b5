"""The training data: webdataset/CSV/synthetic loaders (`loader`), start-up checks and damage handling
(`checks`), the loader's bookkeeping (`info`), the resumable data position (`position`) and the built-in
synthetic data set (`synthetic/`)."""
