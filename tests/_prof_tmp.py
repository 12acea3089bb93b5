import pathlib, tempfile, time, gc
import test_data as T
tmp = pathlib.Path(tempfile.mkdtemp())
pattern = T.write_shards(tmp, 1, 16)
info = T.train_info(train_data=pattern, train_num_samples=16, workers=1, uses_per_sample_state=True, data_size=12)
try:
    T.epoch_keys(info)
except ValueError as e:
    err = e
    print("raised")
t = time.time(); del err; gc.collect(); print(f"shutdown {time.time()-t:.2f}")
t = time.time(); del info; gc.collect(); print(f"del info {time.time()-t:.2f}")
