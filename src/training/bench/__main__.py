"""`python -m training.bench --out DIR [--parts ...]`: see `training.bench.cli`."""
from training.bench.cli import main

if __name__ == "__main__":
    main()
