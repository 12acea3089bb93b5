"""`python -m training.data.synthetic --out DIR --num-samples N`: write the built-in data set as shards."""
from training.data.synthetic.shards import main

if __name__ == "__main__":
    main()
