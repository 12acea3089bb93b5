#!/usr/bin/env python
"""Write procedural image-caption webdataset shards; prints the brace pattern.

    python scripts/make_synthetic_shards.py --out data/synthetic --num-samples 100000 --seed 0

Same as `PYTHONPATH=src python -m training.data.synthetic ...`.
"""
import os
import sys

# Runnable from a checkout without installing the package or setting PYTHONPATH.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

from training.data.synthetic.shards import main  # noqa: E402

if __name__ == "__main__":
    main()
