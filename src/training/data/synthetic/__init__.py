"""The built-in procedural image-caption data set: samples and their captions (`samples`), the webdataset
shard writer (`shards`, also `python -m training.data.synthetic`) and the held-out evaluation tasks (`tasks`)."""
