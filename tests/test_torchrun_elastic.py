"""torchrun as users run it: real agents, two "nodes" on one host, c10d rendezvous, --max-restarts.

The elastic test kills one node's worker with kill -9; both agents restart their workers, which must form
a new process group (torchrun's agent store keeps the dead start's keys: training.elastic), find the run
folder the first start named (no --name given) and resume from its newest checkpoint.
"""
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from test_reliability import (EPOCHS, STEPS_PER_EPOCH, baselines, clean_env, flags, free_port,  # noqa: F401
                              resumed_step, tensorboard_losses, wait_until)
from training import elastic

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def without_name(argv: list[str]) -> list[str]:
    i = argv.index("--name")
    return argv[:i] + argv[i + 2:]


def agent(node: int, endpoint: str, argv: list[str], log: Path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "elastic-test", *extra,
           "-m", "training.main", "--", *argv]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)


def worker_of(agent_proc: subprocess.Popen) -> int | None:
    """The training process the agent started (its child running training.main)."""
    out = subprocess.run(["pgrep", "-P", str(agent_proc.pid), "-f", "training.main"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def test_kill9_of_one_nodes_worker_both_restart_and_resume_the_default_named_run(tmp_path, baselines):
    """Bugs caught: restarted workers waiting in init_process_group for the dead start's ranks (stale keys in
    the agent's store); a restart that starts a new timestamped run instead of resuming; resumed steps that
    differ from an uninterrupted run."""
    logs = tmp_path / "logs"
    argv = without_name(flags(logs, "unused", "neuclip", "--batch-size", "4", "--save-every-n-steps", "3",
                              "--report-to", "tensorboard"))
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [agent(n, endpoint, argv, tmp_path / f"agent{n}.log", "--max-restarts", "1") for n in (0, 1)]
    try:
        wait_until(lambda: logs.exists() and any((d / "checkpoints" / "iter_3.pt").exists() for d in logs.iterdir()),
                   agents, what="iter_3.pt")
        victim = wait_until_value(lambda: worker_of(agents[1]), "node 1's worker")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        codes = [a.wait(timeout=300) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    text = "".join((tmp_path / f"agent{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], text
    (run_dir,) = logs.iterdir()  # one run folder: the restart found the first start's
    start = resumed_step(run_dir)
    assert 3 <= start < STEPS_PER_EPOCH * EPOCHS
    launches = tensorboard_losses(run_dir)
    relaunched = launches[-1]
    # TensorBoard numbers steps from 0 as open_clip does; the baselines' history counts them from 1
    assert sorted(relaunched) == list(range(start, STEPS_PER_EPOCH * EPOCHS))
    baseline = baselines("neuclip")
    assert [relaunched[s] for s in sorted(relaunched)] == pytest.approx(
        [baseline[s + 1]["loss"] for s in sorted(relaunched)], rel=1e-5)
    print(f"kill -9 -> both agents done: {time.monotonic() - killed:.0f} s")


def wait_until_value(get, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while (value := get()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_rank_waiting_for_its_peers_says_where_and_how_long(tmp_path):
    """Bug caught: minutes of silence while a rank waits to form the process group (a peer that never
    started, a wrong MASTER_ADDR): the log must name the endpoint and the time waited."""
    port = free_port()
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="1", WORLD_SIZE="2", LOCAL_RANK="0",
                    NEUCLIP_WAIT_REPORT_S="1")
    log = tmp_path / "rank1.log"
    argv = flags(tmp_path, "alone", "openclip")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "src" / "training" / "main.py"), *argv], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "still waiting after 2 s" in log.read_text(), [proc], timeout=120,
                   what="the waiting rank's report")
    finally:
        proc.kill()
        proc.wait()
    assert f"rank 1 of 2: forming the process group at 127.0.0.1:{port}" in log.read_text()


def run_start(server, world: int, timeout_s: float = 20.0) -> list[str]:
    """One start of `world` ranks, each a client of its own, as each worker process is."""
    out = [None] * world

    def rank(r):
        store = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        out[r] = elastic.agree_generation(store, r, world, datetime.timedelta(seconds=timeout_s), poll_s=0.01)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_every_start_agrees_on_a_token_no_earlier_start_had():
    """Bugs caught: a generation reused across starts (then a restarted group reads the dead ranks' keys),
    ranks of one start disagreeing (they would wait in different key spaces), and world sizes changing between
    starts (an elastic membership change) confusing the handshake."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    seen = []
    for world in (3, 3, 2, 4):
        tokens = run_start(server, world)
        assert len(set(tokens)) == 1 and tokens[0] is not None, tokens
        assert tokens[0] not in seen
        seen.append(tokens[0])


def test_a_rank_starting_after_rank_0_read_its_stale_token_still_joins():
    """Bug caught: rank 0 answering only the first token it reads under a rank's key. After a restart that
    key holds the dead start's token until the new rank posts its own, later; that must be answered too."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    run_start(server, 2)  # the first start leaves neuclip/hello/1 behind
    stale = server.get("neuclip/hello/1").decode()
    server.delete_key(f"neuclip/answer/{stale}")
    tokens = [None, None]

    def rank0():
        tokens[0] = elastic.agree_generation(dist.TCPStore("127.0.0.1", server.port, is_master=False), 0, 2,
                                             datetime.timedelta(seconds=20), poll_s=0.01)
    leader = threading.Thread(target=rank0)
    leader.start()
    wait_until_value(lambda: True if server.check([f"neuclip/answer/{stale}"]) else None, "the stale token answered")
    tokens[1] = elastic.agree_generation(dist.TCPStore("127.0.0.1", server.port, is_master=False), 1, 2,
                                         datetime.timedelta(seconds=20), poll_s=0.01)
    leader.join(30)
    assert tokens[0] == tokens[1] is not None


def test_a_rank_that_never_joins_is_named():
    """Bug caught: rank 0 waiting forever, or failing without saying which rank is missing."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    joined = threading.Thread(target=lambda: elastic.agree_generation(
        dist.TCPStore("127.0.0.1", server.port, is_master=False), 1, 3, datetime.timedelta(seconds=10)))
    joined.start()
    with pytest.raises(dist.DistError, match=r"rank\(s\) 2 did not join within 2 s"):
        elastic.agree_generation(server, 0, 3, datetime.timedelta(seconds=2), poll_s=0.01)
    joined.join(15)


def test_elastic_node_ranges_are_refused_in_one_line_and_fixed_ones_pass():
    """Bug caught: `--nnodes 1:2` starting a run that dies at the first node joining (torch's rendezvous
    fails on its shared store) instead of saying so at start-up; a fixed --nnodes refused by mistake."""
    worker = {"TORCHELASTIC_RUN_ID": "r"}
    refusal = elastic.elastic_range_refusal(worker, "python -m torch.distributed.run --nnodes 1:2 -m training.main")
    assert refusal and "--nnodes 1:2" in refusal and "\n" not in refusal
    assert elastic.elastic_range_refusal({**worker, "PET_NNODES": "2:4"}, "") is not None
    for cmdline in ("torchrun --nnodes 2 --nproc_per_node 1 x", "torchrun --nnodes=2:2 x", "torchrun --standalone x"):
        assert elastic.elastic_range_refusal(worker, cmdline) is None
    assert elastic.elastic_range_refusal({}, "torchrun --nnodes 1:2 x") is None  # not a torchrun worker


def test_torchrun_with_an_elastic_node_range_exits_2_with_one_line(tmp_path):
    """The real agent with --nnodes 1:2: the worker refuses before any training, exit status 2, one line."""
    argv = flags(tmp_path, "ranged", "openclip")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-conf",
           "last_call_timeout=1", "-m", "training.main", "--", *argv]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if "--nnodes 1:2" in ln and "not supported" in ln]
    assert len(lines) == 1, done.stderr[-3000:]
    assert not (tmp_path / "ranged").exists()
