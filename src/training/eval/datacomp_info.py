"""`info.pkl`: the file upstream DataComp's evaluate.py reads from a run folder (the fork reads the checkpoints)."""
import os
import pickle


def write_info_pkl(run_dir: str, arch: str, checkpoint_path: str) -> str:
    """`run_dir/info.pkl` as upstream DataComp's evaluate.py reads it; written atomically."""
    path = os.path.join(run_dir, "info.pkl")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump({"scale_config": {"model": arch}, "checkpoint": os.path.abspath(checkpoint_path)}, f)
    os.replace(tmp, path)
    return path
