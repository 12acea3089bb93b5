"""The data flags completed before any check reads them: the built-in synthetic data set when no
--train-data is given, and the sizes that follow from it."""
from training.errors import UserError
from training.params import SYNTHETIC_DEFAULT_SAMPLES


def fill_data_defaults(args) -> None:
    """The built-in synthetic data set when no --train-data is given; its size is --train-num-samples, as
    open_clip's synthetic data set's (--synthetic-num-samples is this project's spelling)."""
    if args.train_data is None and args.dataset_type in ("auto", "synthetic"):
        args.dataset_type = "synthetic"
        sizes = {n for n in (args.train_num_samples, args.synthetic_num_samples) if n is not None}
        if len(sizes) > 1:
            raise UserError(f"--train-num-samples {args.train_num_samples} and --synthetic-num-samples "
                            f"{args.synthetic_num_samples} both size the synthetic data set: give one")
        args.train_num_samples = sizes.pop() if sizes else SYNTHETIC_DEFAULT_SAMPLES
        args.synthetic_num_samples = args.train_num_samples
        if args.data_size < 0:
            args.data_size = args.synthetic_num_samples
    elif args.train_data is None:
        raise UserError(f"--dataset-type {args.dataset_type} needs --train-data")
    if args.synthetic_num_samples is None:  # unused without the synthetic set; params.txt keeps one value
        args.synthetic_num_samples = SYNTHETIC_DEFAULT_SAMPLES
    if args.uses_per_sample_state and args.data_size < 1:
        raise UserError("this method keeps per-sample state indexed by sample key: set --data_size to the "
                         "largest key + 1 (for img2dataset shards: number of shards x 10000)")
