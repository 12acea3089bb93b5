# open_clip's own end-to-end training tests, run against this trainer (a peer test).
#
# Source: https://github.com/mlfoundations/open_clip, tag v3.3.0, tests/test_training_simple.py (MIT license,
# notice below). Changed here, and nothing else:
#   - `from open_clip_train.main import main` -> `from training.main import main`, called through a wrapper that
#     appends --no-builtin-eval: open_clip's synthetic data set is a blank image with no evaluation, this
#     project's is a real shapes data set evaluated after every epoch by default (4000 images through RN50:
#     over 14 minutes on one thread of 2 shared cores, measured, against 30 s for the 4 training steps);
#   - each test runs in its own temporary folder (open_clip's main writes ./logs; the run folders stay out
#     of the checkout), and CUDA_VISIBLE_DEVICES="" is set per test instead of at import, so that it does
#     not hide GPUs from the rest of the suite;
#   - test_training_coca and test_training_clip_with_jit are marked xfail(strict) with the reason: this
#     trainer refuses CoCa models and --torchscript with one line (exit 2). Strict: the day either trains,
#     the mark must go;
#   - test_training_mt5 is skipped with the reason: it downloads google/mt5-base (2.3 GB) from the Hugging Face
#     hub, which CI cannot reach (open_clip_train cannot run it offline either).
# The flags of every test are open_clip's, unchanged.
#
# Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman,
# Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar,
# John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi,
# Ludwig Schmidt
#
# Permission is hereby granted, free of charge, to any person obtaining
# a copy of this software and associated documentation files (the
# "Software"), to deal in the Software without restriction, including
# without limitation the rights to use, copy, modify, merge, publish,
# distribute, sublicense, and/or sell copies of the Software, and to
# permit persons to whom the Software is furnished to do so, subject to
# the following conditions:
#
# The above copyright notice and this permission notice shall be
# included in all copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND,
# EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
# MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
# NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE
# LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION
# OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION
# WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""open_clip v3.3.0's tests/test_training_simple.py against training.main (header above: what changed).
Bugs each catches: an open_clip command that trains differently here (--train-num-samples ignored for the
synthetic set: 5000 steps instead of 4), or that is refused although open_clip_train runs it."""
import os
import sys
import pytest
import torch
from training.main import main as training_main


def main(argv):
    return training_main([*argv, "--no-builtin-eval"])  # see the header: the one flag added

COCA_REFUSED = ("CoCa is refused in one line (exit 2): this trainer has no caption loss; train CoCa with "
                "open_clip_train")
TORCHSCRIPT_REFUSED = ("--torchscript is refused in one line (exit 2): a scripted model is not trained here; "
                       "--torchcompile is the speed-up")


@pytest.fixture(autouse=True)
def in_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


if hasattr(torch._C, '_jit_set_profiling_executor'):
    # legacy executor is too slow to compile large models for unit tests
    # no need for the fusion performance here
    torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_mode(False)

@pytest.mark.skipif(sys.platform.startswith('darwin'), reason="macos pickle bug with locals")
def test_training():
    main([
    '--save-frequency', '1',
    '--zeroshot-frequency', '1',
    '--dataset-type', "synthetic",
    '--train-num-samples', '16',
    '--warmup', '1',
    '--batch-size', '4',
    '--lr', '1e-3',
    '--wd', '0.1',
    '--epochs', '1',
    '--workers', '2',
    '--model', 'RN50'
    ])

@pytest.mark.xfail(raises=SystemExit, strict=True, reason=COCA_REFUSED)
@pytest.mark.skipif(sys.platform.startswith('darwin'), reason="macos pickle bug with locals")
def test_training_coca():
    main([
    '--save-frequency', '1',
    '--zeroshot-frequency', '1',
    '--dataset-type', "synthetic",
    '--train-num-samples', '16',
    '--warmup', '1',
    '--batch-size', '4',
    '--lr', '1e-3',
    '--wd', '0.1',
    '--epochs', '1',
    '--workers', '2',
    '--model', 'coca_ViT-B-32'
    ])

@pytest.mark.skip(reason="downloads google/mt5-base (2.3 GB) from the Hugging Face hub: not reachable in CI")
@pytest.mark.skipif(sys.platform.startswith('darwin'), reason="macos pickle bug with locals")
def test_training_mt5():
    main([
    '--save-frequency', '1',
    '--zeroshot-frequency', '1',
    '--dataset-type', "synthetic",
    '--train-num-samples', '16',
    '--warmup', '1',
    '--batch-size', '4',
    '--lr', '1e-3',
    '--wd', '0.1',
    '--epochs', '1',
    '--workers', '2',
    '--model', 'mt5-base-ViT-B-32',
    '--lock-text',
    '--lock-text-unlocked-layers', '2'
    ])



@pytest.mark.skipif(sys.platform.startswith('darwin'), reason="macos pickle bug with locals")
def test_training_unfreezing_vit():
    main([
    '--save-frequency', '1',
    '--zeroshot-frequency', '1',
    '--dataset-type', "synthetic",
    '--train-num-samples', '16',
    '--warmup', '1',
    '--batch-size', '4',
    '--lr', '1e-3',
    '--wd', '0.1',
    '--epochs', '1',
    '--workers', '2',
    '--model', 'ViT-B-32',
    '--lock-image',
    '--lock-image-unlocked-groups', '5',
    '--accum-freq', '2'
    ])


@pytest.mark.xfail(raises=SystemExit, strict=True, reason=TORCHSCRIPT_REFUSED)
@pytest.mark.skipif(sys.platform.startswith('darwin'), reason="macos pickle bug with locals")
def test_training_clip_with_jit():
    main([
    '--save-frequency', '1',
    '--zeroshot-frequency', '1',
    '--dataset-type', "synthetic",
    '--train-num-samples', '16',
    '--warmup', '1',
    '--batch-size', '4',
    '--lr', '1e-3',
    '--wd', '0.1',
    '--epochs', '1',
    '--workers', '2',
    '--model', 'ViT-B-32',
    '--torchscript'
    ])
