"""The clients beside the trainer: open_clip's own flags (open_clip_flags) and model options (model_setup),
experiment trackers (reporting: TensorBoard, wandb) and copying the run folder elsewhere (remote_sync)."""
