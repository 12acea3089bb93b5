"""Tests for training.data.loader: tiny shards and CSVs written per test, a char-level stand-in tokenizer."""
import argparse
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from training.data.loader import get_data, resolve_dataset_type
from training.data.checks import SkipLog, group_by_keys

CONTEXT = 16
IMAGE_SIDE = 8


def char_tokenizer(texts):
    """Stand-in for an open_clip tokenizer: list of str -> long [n, CONTEXT], one token per character."""
    return torch.tensor([[ord(c) for c in text[:CONTEXT].ljust(CONTEXT)] for text in texts], dtype=torch.long)


def detokenize(tokens) -> str:
    return "".join(chr(int(t)) for t in tokens).strip()


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (value % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_args(**overrides):
    fields = dict(train_data=None, val_data=None, dataset_type="auto", dataset_resampled=False,
                  csv_img_key="filepath", csv_caption_key="title", csv_separator="\t", batch_size=4, workers=0,
                  train_num_samples=None, val_num_samples=None, seed=0, world_size=1, rank=0, data_size=-1,
                  uses_per_sample_state=False, synthetic_num_samples=16, synthetic_seed=0)
    fields.update(overrides)
    return argparse.Namespace(**fields)


def sample(key: int, name=None, json_key=True, **members):
    """A well-formed sample whose image, caption and key all encode `key`."""
    result = {"__key__": name if name is not None else f"{key:06d}", "png": png_bytes(key),
              "txt": f"caption {key}".encode()}
    if json_key:
        result["json"] = json.dumps({"key": key}).encode()
    result.update(members)
    return {k: v for k, v in result.items() if v is not None}


def write_shards(directory, num_shards, per_shard, **sample_options) -> str:
    """Shards 00000.tar... holding keys 0..num_shards*per_shard-1; returns the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as sink:
            for key in range(shard * per_shard, (shard + 1) * per_shard):
                sink.write(sample(key, **sample_options))
    return str(directory / f"{{00000..{num_shards - 1:05d}}}.tar")


def train_info(tokenizer=char_tokenizer, **overrides):
    return get_data(make_args(**overrides), to_tensor, to_tensor, tokenizer)["train"]


def epoch_batches(info, epoch=0):
    info.set_epoch(epoch)
    return list(info.dataloader)


def epoch_keys(info, epoch=0) -> list[int]:
    return [int(k) for _, _, keys in epoch_batches(info, epoch) for k in keys]


def check_batch(batch, batch_size):
    images, texts, keys = batch
    assert images.shape == (batch_size, 3, IMAGE_SIDE, IMAGE_SIDE) and images.dtype == torch.float32
    assert texts.shape == (batch_size, CONTEXT) and texts.dtype == torch.long
    assert keys.shape == (batch_size,) and keys.dtype == torch.int64
    for image, tokens, key in zip(images, texts, keys.tolist()):  # image, caption and key stay together
        assert detokenize(tokens) == f"caption {key}"
        assert round(float(image[0, 0, 0]) * 255) == key % 256


# ------------------------------------------------------------------------------- tar parsing

def test_group_by_keys_tolerates_end_of_shard_marker_and_shard_changes():
    files = [{"fname": "0.png", "data": b"a", "__url__": "s0"}, {"fname": "0.txt", "data": b"t", "__url__": "s0"},
             {},  # webdataset 1.0.2's end-of-shard marker
             {"fname": "1.png", "data": b"b", "__url__": "s1"},
             # same name in the next shard, no marker between (a truncated shard): still two samples
             {"fname": "1.txt", "data": b"c", "__url__": "s2"}]
    samples = list(group_by_keys(iter(files), SkipLog("test").handle, keep=frozenset({"png", "txt"})))
    assert [(s["__url__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("s0", ["png", "txt"]), ("s1", ["png"]), ("s2", ["txt"])]


def test_keys_come_from_json_key_field(tmp_path):
    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        for i in range(8):
            sink.write(sample(100 + i, name=f"img_{i}"))
    info = train_info(train_data=str(tmp_path / "0.tar"), train_num_samples=8)
    batches = epoch_batches(info)
    for batch in batches:
        check_batch(batch, 4)
    assert sorted(int(k) for _, _, keys in batches for k in keys) == list(range(100, 108))


def test_keys_fall_back_to_numeric_sample_name(tmp_path):
    pattern = write_shards(tmp_path, 1, 8, json_key=False)
    assert sorted(epoch_keys(train_info(train_data=pattern, train_num_samples=8))) == list(range(8))


def test_non_numeric_name_without_json_key_raises_naming_shard_and_fix(tmp_path):
    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        sink.write(sample(0, name="cat_photo", json_key=False))
    info = train_info(train_data=str(tmp_path / "0.tar"), train_num_samples=4)
    with pytest.raises(ValueError, match=r"(?s)0\.tar.*add a \.json with an integer 'key' field"):
        epoch_keys(info)


def test_brace_patterns_joined_with_double_colon(tmp_path):
    first = write_shards(tmp_path / "a", 2, 4)
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        for key in range(8, 12):
            sink.write(sample(key))
    info = train_info(train_data=f"{first}::{tmp_path / 'b.tar'}", train_num_samples=12)
    assert sorted(epoch_keys(info)) == list(range(12))


# ------------------------------------------------------------------- epochs, workers, ranks

def test_every_key_once_per_epoch_with_two_workers(tmp_path):
    pattern = write_shards(tmp_path, 4, 8)
    info = train_info(train_data=pattern, train_num_samples=32, workers=2)
    assert info.num_batches == 8 and info.num_samples == 32
    batches = epoch_batches(info)
    assert len(batches) == 8
    for batch in batches:
        check_batch(batch, 4)
    assert sorted(int(k) for _, _, keys in batches for k in keys) == list(range(32))


def test_two_ranks_see_disjoint_keys_covering_the_data(tmp_path):
    pattern = write_shards(tmp_path, 4, 9)  # 36 samples; 32 fit in the epoch, 1 per shard is left over
    per_rank = []
    for rank in (0, 1):
        info = train_info(train_data=pattern, train_num_samples=32, workers=2, world_size=2, rank=rank)
        assert info.num_batches == 4
        keys = epoch_keys(info)
        assert len(keys) == 16 == len(set(keys))
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    union = per_rank[0] | per_rank[1]
    for shard in range(4):  # each shard read by exactly one worker, all but the dropped remainder
        assert len([k for k in union if k // 9 == shard]) == 8


def test_shuffle_differs_between_epochs_and_reproduces_an_epoch(tmp_path):
    pattern = write_shards(tmp_path, 4, 8)
    info = train_info(train_data=pattern, train_num_samples=32, workers=2)
    first, second, first_again = epoch_keys(info, 0), epoch_keys(info, 1), epoch_keys(info, 0)
    assert sorted(first) == sorted(second) == list(range(32))
    assert first != second
    assert first == first_again
    assert epoch_keys(train_info(train_data=pattern, train_num_samples=32, workers=2, seed=1), 0) != first


def test_resampled_yields_the_requested_number_of_batches(tmp_path):
    pattern = write_shards(tmp_path, 2, 25)  # big enough that filling the shuffle buffer opens few shards
    info = train_info(train_data=pattern, train_num_samples=22, workers=2, dataset_resampled=True)
    assert info.num_batches == 6 and info.num_samples == 24  # ceil(22 / 4) = 6 batches, 3 per worker
    batches = epoch_batches(info)
    assert len(batches) == 6
    for batch in batches:
        check_batch(batch, 4)
    assert epoch_keys(info, 1) != epoch_keys(info, 2)
    assert epoch_keys(info, 1) == epoch_keys(info, 1)


def test_validation_keeps_order_and_the_partial_batch(tmp_path):
    pattern = write_shards(tmp_path, 2, 5)
    data = get_data(make_args(val_data=pattern, val_num_samples=10), to_tensor, to_tensor, char_tokenizer)
    assert set(data) == {"val"}
    batches = list(data["val"].dataloader)
    assert [len(keys) for _, _, keys in batches] == [4, 4, 2]
    assert [int(k) for _, _, keys in batches for k in keys] == list(range(10))
    assert data["val"].num_batches == 3


def test_open_clip_tokenizer(tmp_path):
    import open_clip  # a required client: fails, never skips, when missing
    pattern = write_shards(tmp_path, 1, 4)
    images, texts, keys = epoch_batches(train_info(open_clip.tokenize, train_data=pattern, train_num_samples=4))[0]
    assert texts.shape == (4, 77) and texts.dtype == torch.long
    assert torch.equal(texts, open_clip.tokenize([f"caption {k}" for k in keys.tolist()]))


# ---------------------------------------------------------------------------- damaged data

def truncate_inside_member(path, member_index):
    """Cut a tar in the middle of a member's data, as an interrupted download would."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[member_index]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_samples_are_skipped_counted_and_logged(tmp_path, workers, caplog):
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for key in range(8):
            bad = {3: {"png": b"not an image"}, 5: {"txt": None}}.get(key, {})  # undecodable; no caption
            sink.write(sample(key, **bad))
    write_shards_at = tmp_path / "00001.tar"
    with wds.TarWriter(str(write_shards_at)) as sink:
        for key in range(8, 16):
            sink.write(sample(key))
    truncate_inside_member(write_shards_at, member_index=3 * 5)  # a member of key 13: 8..12 survive
    caplog.set_level(logging.WARNING, logger="training.data")

    info = train_info(train_data=str(tmp_path / "{00000..00001}.tar"), train_num_samples=16, workers=workers)
    batches = epoch_batches(info)
    assert len(batches) == info.num_batches == 4
    for batch in batches:
        check_batch(batch, 4)
    keys = {int(k) for _, _, ks in batches for k in ks}
    assert not keys & {3, 5, 13, 14, 15}
    assert info.skipped() >= 3  # the image, the caption, the truncated shard (more when a shard repeats)
    if workers == 0:  # worker processes log to their own copies of the handlers
        assert "cannot decode" in caplog.text and "no caption" in caplog.text


# --------------------------------------------------------------------------- start-up checks

def test_missing_shards_are_named_and_counted(tmp_path):
    write_shards(tmp_path, 2, 4)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 expanded shards.*00002\.tar"):
        train_info(train_data=str(tmp_path / "{00000..00002}.tar"), train_num_samples=8)


def test_fewer_shards_than_readers_raises_unless_resampled(tmp_path):
    pattern = write_shards(tmp_path, 3, 4)
    with pytest.raises(ValueError, match=r"3 shards.*--workers 2 x world size 2 = 4.*hang.*--dataset-resampled"):
        train_info(train_data=pattern, train_num_samples=12, workers=2, world_size=2)
    train_info(train_data=pattern, train_num_samples=12, workers=2, world_size=2, dataset_resampled=True)


def test_webdataset_requires_train_num_samples(tmp_path):
    with pytest.raises(ValueError, match="--train-num-samples is required"):
        train_info(train_data=write_shards(tmp_path, 1, 4))


@pytest.mark.parametrize("workers", [0, 1])
def test_key_beyond_data_size_raises_naming_both(tmp_path, workers):
    pattern = write_shards(tmp_path, 1, 16)
    info = train_info(train_data=pattern, train_num_samples=16, workers=workers, uses_per_sample_state=True,
                      data_size=12)
    with pytest.raises(ValueError, match=r"key 1[2-5] .*--data_size 12.*set --data_size to max key \+ 1"):
        epoch_keys(info)


def test_per_sample_state_needs_data_size(tmp_path):
    with pytest.raises(ValueError, match="--data_size"):
        train_info(train_data=write_shards(tmp_path, 1, 4), train_num_samples=4, uses_per_sample_state=True)


def test_dataset_type_inferred_from_extension():
    assert resolve_dataset_type("s/{00000..00009}.tar::t/0.tar", "auto", "--train-data") == "webdataset"
    assert resolve_dataset_type("rows.tsv", "auto", "--train-data") == "csv"
    assert resolve_dataset_type("rows.tsv", "webdataset", "--train-data") == "webdataset"
    with pytest.raises(ValueError, match="--dataset-type"):
        resolve_dataset_type("rows.parquet", "auto", "--train-data")


# ------------------------------------------------------------------------------------ CSV

def write_csv(tmp_path, num_rows, broken=(), separator="\t", columns=("filepath", "title")):
    lines = [separator.join(columns)]
    for row in range(num_rows):
        image_path = tmp_path / f"{row}.png"
        image_path.write_bytes(b"garbage" if row in broken else png_bytes(row))
        lines.append(separator.join([str(image_path), f"caption {row}"]))
    path = tmp_path / "rows.tsv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_csv_keys_are_row_numbers(tmp_path):
    path = write_csv(tmp_path, 10)
    info = train_info(train_data=path, batch_size=4)
    assert info.num_batches == 2 and info.num_samples == 8
    first = epoch_batches(info, 0)
    for batch in first:
        check_batch(batch, 4)
    first_keys = [int(k) for _, _, keys in first for k in keys]
    assert len(set(first_keys)) == 8 and set(first_keys) <= set(range(10))
    assert epoch_keys(info, 1) != first_keys and epoch_keys(info, 0) == first_keys

    val = get_data(make_args(val_data=path, batch_size=4), to_tensor, to_tensor, char_tokenizer)["val"]
    assert [int(k) for _, _, keys in val.dataloader for k in keys] == list(range(10))


def test_csv_unreadable_image_is_replaced_and_counted(tmp_path):
    info = train_info(train_data=write_csv(tmp_path, 8, broken={2}), batch_size=4, workers=2)
    batches = epoch_batches(info)
    assert len(batches) == 2
    for batch in batches:
        check_batch(batch, 4)  # still full
    assert 2 not in {int(k) for _, _, keys in batches for k in keys}
    assert info.skipped() == 1


def test_csv_missing_column_names_the_available_ones(tmp_path):
    path = write_csv(tmp_path, 2, columns=("path", "title"))
    with pytest.raises(ValueError, match=r"--csv-img-key 'filepath'.*\['path', 'title'\]"):
        train_info(train_data=path)


def test_csv_rows_beyond_data_size_raise_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"key 9 .*--data_size 9"):
        train_info(train_data=write_csv(tmp_path, 10), uses_per_sample_state=True, data_size=9)


# ------------------------------------------------------------------------------ synthetic

def test_synthetic_data_set(tmp_path):
    info = train_info(dataset_type="synthetic", synthetic_num_samples=12, batch_size=4)
    assert info.num_batches == 3
    images, texts, keys = epoch_batches(info)[0]
    assert images.shape == (4, 3, 64, 64) and texts.shape == (4, CONTEXT) and keys.dtype == torch.int64
    assert sorted(epoch_keys(info, 1)) == list(range(12))
    assert info.skipped() == 0
