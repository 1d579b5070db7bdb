"""Fault drills: run each fault of issues 10 and 21 against the real ``kinfonce`` command.

Each drill starts ``python -m kinfonce.cli`` processes on tiny digits runs (or tiny image
trees), injects the fault for real (two processes at once, ``kill -9`` at random times,
a full tmpfs, SIGINT, copies that lose file times, corrupt files) and checks the outcome.
The table it prints is docs/reliability.md's.

Usage:
    python benchmarks/fault_drills.py [--workdir DIR] [--skip-ddp]

The full-disk and read-only drills mount tmpfs file systems and need root; without it they
are reported as not run. The issue-21 tune drills need ``ray`` on the PATH (the venv's) for
a ``ray start`` cluster. Prints a markdown table and ends with ``RESULT drills=N as_expected=M``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = [
    "--train-subset", "64", "--batch-size", "32", "--warmup-epochs", "0",
    "--proj-hidden-dim", "32", "--eval-linear-epochs", "2", "--eval-knn-k", "10",
    "--no-baselines", "--no-progress",
]  # fmt: skip
ROWS: list[tuple[str, str, str, bool]] = []


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **extra}


def start(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kinfonce.cli", *args],
        env=env(**(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A background shell starts jobs with SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler: give the child the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Exit code and the last stderr line that is not a Python warning."""
    _, err = proc.communicate(timeout=timeout)
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and "Warning" not in line and not line.startswith("  ")
    ]
    return proc.returncode, (lines[-1] if lines else "")


def kinfonce(*args: str, **kwargs) -> tuple[int, str]:
    return finish(start(*args, **kwargs))


def wait_for(
    test: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting ({proc.returncode=})")
        time.sleep(poll)


def log_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as file:
        return [int(row["epoch"]) for row in csv.DictReader(file) if row.get("train_loss")]


def has_epoch(run_dir: Path, epoch: int) -> Callable[[], bool]:
    return lambda: epoch in log_epochs(run_dir)


def readable_checkpoints(run_dir: Path) -> tuple[list[str], list[str]]:
    from kinfonce.checkpoints import load_checkpoint

    good, bad = [], []
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        try:
            load_checkpoint(path)
            good.append(path.name)
        except ValueError:
            bad.append(path.name)
    return good, bad


def record(case: str, fault: str, outcome: str, ok: bool) -> None:
    """One table row; temporary paths become WORK/, error lines lose their prefix."""
    outcome = re.sub(r"kinfonce \w+: error: ", "", outcome)
    outcome = outcome.replace(os.environ.get("DRILL_WORK", "\0"), "WORK")
    ROWS.append((case, fault, outcome, ok))
    print(f"[{'ok' if ok else 'UNEXPECTED'}] {case}: {fault}: {outcome}", flush=True)


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def consistent_csv(run_dir: Path) -> bool:
    with (run_dir / "logs" / "metrics.csv").open() as file:
        rows = list(csv.reader(file))
    return all(len(row) == len(rows[0]) for row in rows)


def drill_two_processes(work: Path) -> None:
    run = work / "two"
    # A long final evaluation keeps the first run busy (and its lock held) while the second
    # process starts, even on a loaded machine.
    slow = ["--epochs", "8", "--eval-linear-epochs", "30000"]
    first = start("pretrain", *TINY, *slow, "--output-dir", str(run))
    wait_for(lambda: (run / "config.yaml").is_file(), first)
    code, line = kinfonce("pretrain", *TINY, *slow, "--lr", "0.5", "--output-dir", str(run))
    overlapped = first.poll() is None
    first_code, _ = finish(first)
    lr = yaml.safe_load((run / "config.yaml").read_text())["lr"]
    ok = code == 2 and "in use" in line and first_code == 0 and lr == 1.0 and consistent_csv(run)
    record("1", "second run into a running run's --output-dir",
           f"exit {code}: `{line}`; first run still running then: {overlapped}, its exit "
           f"{first_code}, config.yaml lr={lr} (the first's), CSV consistent", ok)  # fmt: skip
    race = work / "race"
    procs = [start("pretrain", *TINY, "--epochs", "2", "--output-dir", str(race)) for _ in "ab"]
    results = sorted(finish(proc) for proc in procs)
    ok = [c for c, _ in results] == [0, 2] and consistent_csv(race)
    record("1", "two runs started at the same instant into one directory",
           f"exit codes {[c for c, _ in results]}; the refused one: `{results[1][1]}`", ok)  # fmt: skip


def drill_run_files(work: Path) -> None:
    run = work / "files"
    run.mkdir()
    (run / "config.yaml").write_text("lr: 0.3\n")
    (run / "metrics.json").write_text("{}\n")
    before = files_under(run)
    code, line = kinfonce("pretrain", *TINY, "--epochs", "1", "--output-dir", str(run))
    record("2", "--output-dir holding config.yaml and metrics.json, no checkpoint",
           f"exit {code}: `{line}`; files unchanged: {files_under(run) == before}",
           code == 2 and files_under(run) == before)  # fmt: skip


def drill_kill_storm(work: Path, kills: int = 8) -> None:
    """kill -9 alternately the moment a checkpoint's temporary file appears (inside a write)
    and at a random time, resuming after each."""
    run, rng = work / "storm", random.Random(0)
    args = ["pretrain", *TINY, "--epochs", "30", "--output-dir", str(run)]
    shm = {"TMPDIR": "/dev/shm"} if Path("/dev/shm").is_dir() else {}
    all_readable, inside_write = True, 0
    for attempt in range(kills):
        proc = start(*args, *(["--resume"] if attempt else []), extra_env=shm)
        if attempt % 2 == 0:
            wait_for(lambda: any((run / "checkpoints").glob(".*.kinfonce-tmp")), proc, poll=0)
        else:
            wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file(), proc)
            time.sleep(rng.uniform(0.0, 3.0))
        proc.kill()
        proc.communicate()
        inside_write += any((run / "checkpoints").glob(".*.kinfonce-tmp"))
        _, bad = readable_checkpoints(run)
        all_readable &= not bad
    code, _ = kinfonce(*args, "--resume", extra_env=shm)
    epochs = log_epochs(run)
    ok = all_readable and code == 0 and epochs == list(range(30))
    record("3", f"kill -9 {kills} times (TMPDIR=/dev/shm): half the moment a checkpoint's "
           "temporary file appears, half at random times; resume after each",
           f"{inside_write} kill(s) landed inside a checkpoint write; every .ckpt readable "
           f"after every kill: {all_readable}; final resume exit {code}, log epochs 0-29 "
           f"each once: {epochs == list(range(30))}", ok)  # fmt: skip


def drill_full_disk(work: Path) -> None:
    with tmpfs(work / "full", "size=6m") as mount:
        if mount is None:
            record("3", "full disk during a checkpoint write", "not run (needs root to mount)",
                   True)  # fmt: skip
            return
        run = mount / "run"
        args = ["pretrain", *TINY, "--epochs", "4", "--output-dir", str(run)]
        code, line = kinfonce(*args, extra_env={"TMPDIR": "/dev/shm"})
        good, bad = readable_checkpoints(run)
        temps = [p.name for p in (run / "checkpoints").glob(".*")]
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed, _ = kinfonce(*args, "--resume")
        ok = code == 2 and "no space left" in line and not bad and good and not temps
        ok = ok and resumed == 0
        ok = ok and log_epochs(run) == [0, 1, 2, 3]
        record("3", "disk full (6 MiB tmpfs) while writing checkpoints",
               f"run fails (exit {code}: `{line}`); readable {good}, unreadable {bad}, "
               f"temp files left {temps}; after freeing space --resume exit {resumed}, "
               f"log epochs {log_epochs(run)}", bool(ok))  # fmt: skip


def drill_copied_times(work: Path) -> None:
    from kinfonce.checkpoints import checkpoint_progress, furthest_checkpoint

    run = work / "times"
    args = ["pretrain", *TINY, "--epochs", "30", "--output-dir", str(run)]
    proc = start(*args)
    wait_for(has_epoch(run, 0), proc)
    proc.send_signal(signal.SIGINT)
    finish(proc)
    if not (run / "checkpoints" / "interrupted.ckpt").is_file():
        raise RuntimeError("SIGINT left no interrupted.ckpt (was SIGINT ignored?)")
    proc = start(*args, "--resume")
    wait_for(has_epoch(run, 3), proc)
    proc.kill()
    proc.communicate()
    copy = work / "times-copy"
    shutil.copytree(run, copy, copy_function=shutil.copyfile)  # file times not kept
    os.utime(copy / "checkpoints" / "interrupted.ckpt")  # the newest file on disk
    chosen = furthest_checkpoint(copy / "checkpoints")
    progress = {p.name: checkpoint_progress(p) for p in (copy / "checkpoints").glob("*.ckpt")}
    code, _ = kinfonce(*args[:-1], str(copy), "--resume")
    epochs = log_epochs(copy)
    furthest = progress[chosen.name] == max(progress.values())
    ok = chosen.name != "interrupted.ckpt" and furthest and code == 0 and epochs == list(range(30))
    record("4", "resume of a copy that lost file times (interrupted.ckpt newest)",
           f"(epoch, step) {progress}; resumed from {chosen.name} (the furthest: {furthest}); "
           f"exit {code}; log epochs "
           f"0-29 each once: {epochs == list(range(30))}", ok)  # fmt: skip


def drill_two_kills(work: Path) -> None:
    run = work / "kills"
    args = ["pretrain", *TINY, "--epochs", "6", "--output-dir", str(run)]
    seen = []
    for attempt, epoch in enumerate((1, 3)):
        proc = start(*args, *(["--resume"] if attempt else []))
        wait_for(has_epoch(run, epoch), proc)
        proc.kill()
        proc.communicate()
        seen.append(log_epochs(run))
    code, _ = kinfonce(*args, "--resume")
    epochs = log_epochs(run)
    record("5", "kill -9, resume, kill -9, resume",
           f"log after the kills {seen}; after the last resume (exit {code}) {epochs}",
           code == 0 and epochs == list(range(6)))  # fmt: skip


def drill_bad_values(work: Path) -> None:
    for flags in (["--lr", "nan"], ["--lr", "-1"], ["--warmup-epochs", "-1"],
                  ["--proj-out-dim", "0"], ["--devices", "abc"]):  # fmt: skip
        run = work / "bad"
        code, line = kinfonce("pretrain", *TINY, "--epochs", "1", *flags, "--output-dir", str(run))
        case = "8" if flags[0] in ("--proj-out-dim", "--devices") else "6"
        record(case, " ".join(flags), f"exit {code}: `{line}`; directory created: {run.exists()}",
               code == 2 and not run.exists())  # fmt: skip
    blocker = work / "a-file"
    blocker.write_text("keep")
    code, line = kinfonce("pretrain", *TINY, "--output-dir", str(blocker))
    record("8", "--output-dir that is a file", f"exit {code}: `{line}`",
           code == 2 and blocker.read_text() == "keep")  # fmt: skip


def image_bytes(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_bomb() -> bytes:
    """A valid 1x1 PNG whose header (with a correct CRC) claims 30000 x 30000 pixels."""
    data = bytearray(image_bytes((1, 1), "PNG", 0))
    ihdr = bytes(data[12:16]) + struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def jpeg_bomb() -> bytes:
    """A 16x16 JPEG whose frame header claims 60000 x 60000 pixels."""
    data = bytearray(image_bytes((16, 16), "JPEG", 1))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def write_tree(archive: Path, classes: tuple[str, ...], extra: dict[str, bytes]) -> None:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for split, count in (("train", 40), ("test", 10)):
            for c, name in enumerate(classes):
                for i in range(count):
                    seed = 1000 * c + i + (500 if split == "test" else 0)
                    out.writestr(f"{split}/{name}/{i:03d}.jpg", image_bytes((32, 32), "JPEG", seed))
        for member, data in extra.items():
            out.writestr(member, data)


def break_crc(archive: Path, member: str) -> None:
    """Flip the CRC-32 recorded for ``member`` (local and central headers): its deflated data
    still inflate, and zipfile raises BadZipFile("Bad CRC-32 ...") reading them."""
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zipped:
        info, entry = zipped.getinfo(member), zipped.start_dir  # the central directory
    bad = struct.pack("<I", info.CRC ^ 0xFFFFFFFF)
    raw[info.header_offset + 14 : info.header_offset + 18] = bad
    while raw[entry + 46 : entry + 46 + len(info.filename)] != info.filename.encode():
        entry = raw.index(b"PK\x01\x02", entry + 4)
    raw[entry + 16 : entry + 20] = bad
    archive.write_bytes(bytes(raw))


def drill_image_trees(work: Path) -> None:
    cache = {"KINFONCE_CACHE": str(work / "cache")}
    mixed = work / "mixed.zip"
    write_tree(mixed, ("a", "b"), {"train/a/000-wide.png": image_bytes((200, 100), "PNG", 5),
                                   "train/a/001-tiny.png": image_bytes((5, 3), "PNG", 6)})  # fmt: skip
    proc = start("pretrain", *TINY, "--epochs", "1", "--dataset", f"imagefolder:{mixed}",
                 "--output-dir", str(work / "mixed-run"), extra_env=cache)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    resized = re.search(r"resized \d+ of \d+ images", err)
    side = None
    if proc.returncode == 0:
        from kinfonce.checkpoints import load_checkpoint

        data = load_checkpoint(work / "mixed-run" / "checkpoints" / "last.ckpt")["kinfonce"]["data"]
        side = data["image_size"]
    record("7", "one 200x100 and one 5x3 PNG (sorted first) among 32x32 JPEGs",
           f"exit {proc.returncode}; images {side}x{side}; warning "
           f"`{resized.group(0) if resized else '-'} ...`",
           proc.returncode == 0 and side == 32 and resized is not None)  # fmt: skip
    broken = work / "broken.zip"
    write_tree(broken, ("a", "b"), {"train/b/zz-bomb.png": png_bomb(),
                                    "train/b/zz-bomb.jpg": jpeg_bomb()})  # fmt: skip
    break_crc(broken, "train/a/005.jpg")
    proc = start("pretrain", *TINY, "--epochs", "1", "--dataset", f"imagefolder:{broken}",
                 "--output-dir", str(work / "broken-run"), extra_env=cache)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    skipped = [line for line in err.splitlines() if "skipped" in line and "undecodable" in line]
    reasons = [r for r in ("BadZipFile", "DecompressionBombError") if r in err]
    record("7", "bad CRC-32 in a deflated zip member, a PNG and a JPEG decompression bomb",
           f"exit {proc.returncode}; {skipped[0].split('UserWarning: ')[-1][:60] if skipped else '-'}"
           f"...; reasons named: {reasons}",
           proc.returncode == 0 and len(reasons) == 2)  # fmt: skip
    single = work / "single.zip"
    write_tree(single, ("a",), {})
    code, line = kinfonce("pretrain", *TINY, "--epochs", "1", "--dataset", f"imagefolder:{single}",
                          "--output-dir", str(work / "single-run"), extra_env=cache)  # fmt: skip
    record("7", "a data set with one class", f"exit {code}: `{line}`",
           code == 2 and not (work / "single-run").exists())  # fmt: skip


def drill_eval_holes(work: Path) -> None:
    import torch

    run = work / "holes"
    assert kinfonce("pretrain", *TINY, "--epochs", "1", "--output-dir", str(run))[0] == 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["kinfonce"] = ["not", "a", "mapping"]
    malformed = work / "malformed.ckpt"
    torch.save(checkpoint, malformed)
    code, line = kinfonce("eval", str(malformed), "--no-progress")
    record("8", "checkpoint with a malformed `kinfonce` entry", f"exit {code}: `{line}`",
           code == 2 and "Traceback" not in line)  # fmt: skip
    blocker = work / "blocker"
    blocker.write_text("")
    for command in (["eval", str(run / "checkpoints" / "last.ckpt")], ["synthetic"]):
        began = time.perf_counter()
        code, line = kinfonce(*command, "--output-dir", str(blocker / "out"), "--no-progress")
        spent = time.perf_counter() - began
        record("8", f"`kinfonce {command[0]} --output-dir` below a file",
               f"exit {code} after {spent:.1f} s (process start included): `{line}`",
               code == 2)  # fmt: skip
    slow = work / "ctrl-c"
    args = ["pretrain", *TINY, "--eval-linear-epochs", "30000", "--epochs", "1",
            "--output-dir", str(slow)]  # fmt: skip
    proc = start(*args)
    wait_for(lambda: (slow / "checkpoints" / "last.ckpt").is_file(), proc)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    interrupted_code = proc.returncode
    hint = "--resume" in err and "Traceback" not in err
    code, _ = kinfonce(*args, "--resume")
    record("8", "Ctrl-C during the final evaluation",
           f"exit {interrupted_code}, resume hint and no traceback: {hint}; --resume exit "
           f"{code}, metrics.json: {(slow / 'metrics.json').is_file()}, log epochs "
           f"{log_epochs(slow)}", interrupted_code == 130 and hint and code == 0)  # fmt: skip


def drill_library() -> None:
    import torch

    from kinfonce import KernelInfoNCE

    def outcome(call: Callable[[], object]) -> str:
        try:
            return f"returns {float(call()):.4f}"
        except ValueError as err:
            return f"ValueError: {str(err)[:70]}"

    z = torch.randn(4, 8)
    record("9", "KernelInfoNCE with N = 1",
           outcome(lambda: KernelInfoNCE()(z[:1], z[:1])), True)  # fmt: skip
    record("9", "KernelInfoNCE with N = 0",
           outcome(lambda: KernelInfoNCE()(z[:0], z[:0])), True)  # fmt: skip
    record("9", "empty (0, D) queue",
           outcome(lambda: KernelInfoNCE()(z, z, queue=z[:0])), True)  # fmt: skip
    same = torch.equal(KernelInfoNCE(gather_distributed=True)(z, z + 1), KernelInfoNCE()(z, z + 1))
    record("9", "gather_distributed=True on one process",
           f"equals the ungathered loss: {same}", same)  # fmt: skip


def drill_ddp(work: Path) -> None:
    run = work / "ddp"
    args = ["pretrain", *TINY, "--epochs", "6", "--eval-linear-epochs", "30000", "--accelerator",
            "cpu", "--devices", "2", "--strategy", "ddp", "--output-dir", str(run)]  # fmt: skip
    proc = start(*args)
    wait_for(has_epoch(run, 0), proc)
    second, line = kinfonce(*args, "--resume")
    overlapped = proc.poll() is None
    code, _ = finish(proc)
    record("-", "DDP, 2 CPU processes (rank 0 holds the lock); the same command with --resume "
           "started meanwhile",
           f"DDP exit {code}, log epochs {log_epochs(run)}; the resume (DDP run still running: "
           f"{overlapped}): exit {second}: `{line}`",
           code == 0 and second == 2 and "in use" in line and log_epochs(run) == list(range(6)))  # fmt: skip


# --- issue 21 (round two): case numbers are the points ---------------------------


def family(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def listening_addresses(processes: list) -> list[str]:
    import psutil

    found = set()
    for process in processes:
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(conn.laddr.ip)
        except psutil.Error:
            continue
    return sorted(found)


TUNE = [
    "--dataset", "digits", "--train-subset", "64", "--batch-size", "32", "--warmup-epochs", "0",
    "--proj-hidden-dim", "32", "--num-samples", "1", "--max-concurrent", "1",
]  # fmt: skip


def drill_tune_driver(work: Path) -> None:
    """Points 1, 3 and 15: a local search's sockets, a --resume meanwhile, kill -9."""
    import psutil

    from kinfonce.raysession import is_loopback

    search = work / "search"
    driver = start("tune", *TUNE, "--max-t", "60", "--num-cpus", "1", "--output-dir", str(search))
    wait_for(lambda: any(search.glob("*/run/checkpoints/last.ckpt")), driver, timeout=300)
    processes = family(driver.pid)
    addresses = listening_addresses(processes)
    record("21.1", "local `kinfonce tune` (no --address): listening addresses of all its "
           f"{len(processes)} processes", f"{addresses}",
           bool(addresses) and all(is_loopback(a) for a in addresses))  # fmt: skip
    code, line = kinfonce("tune", "--resume", str(search))
    record("21.3", "`tune --resume DIR` while the search in DIR runs", f"exit {code}: `{line}`",
           code == 2 and "in use" in line and driver.poll() is None)  # fmt: skip
    others = [p for p in processes if p.pid != driver.pid and "raywatch" not in str(p.cmdline())]
    driver.kill()
    driver.wait()
    alive = {}
    for after in (1, 5, 13):
        time.sleep(after - (max(alive) if alive else 0))
        alive[after] = sum(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in others)
    record("21.15", f"kill -9 of the tune driver ({len(others)} Ray processes)",
           f"Ray processes still running 1, 5, 13 s later: {list(alive.values())}",
           alive[5] == 0)  # fmt: skip
    for process in others:  # whatever is left, so that later drills run on a quiet machine
        with contextlib.suppress(psutil.Error):
            process.kill()


def stop_cluster(marker: str) -> None:
    """Kill the processes of the ``ray start`` cluster whose command lines name ``marker``
    (``ray stop`` would stop every Ray of this user on the machine)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                process.kill()


def drill_tune_directory(work: Path) -> None:
    """Points 2, 4 and 12: a crafted tuner.pkl, a cluster that wants a token, a read-only
    file system under --output-dir."""
    crafted = work / "crafted"
    crafted.mkdir()
    search = yaml.safe_load((work / "search" / "search.yaml").read_text())
    (crafted / "search.yaml").write_text(yaml.safe_dump(search))
    marker = work / "code-ran"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (crafted / "tuner.pkl").write_bytes(payload)
    (crafted / "tuner.pkl").chmod(0o666)
    code, line = kinfonce("tune", "--resume", str(crafted))
    record("21.2", "`tune --resume` of a directory with a crafted tuner.pkl (mode 666)",
           f"exit {code}: `{line}`; code ran: {marker.exists()}",
           code == 2 and not marker.exists())  # fmt: skip
    port = str(6400 + random.randrange(400))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    ray_tmp = work / "raytmp"  # marks this cluster's processes: only they are stopped
    started = subprocess.run([ray_cli, "start", "--head", "--port", port, "--num-cpus", "1",
                              "--include-dashboard", "false", "--temp-dir", str(ray_tmp)],
                             env=env(), capture_output=True)  # fmt: skip
    if started.returncode:
        record("21.4", "`tune --address` of a cluster that wants a token", "not run (ray start "
               "failed)", True)  # fmt: skip
    else:
        try:
            target = work / "joined"
            args = ["tune", *TUNE, "--max-t", "1", "--address", f"127.0.0.1:{port}",
                    "--output-dir", str(target)]  # fmt: skip
            tries = [kinfonce(*args) for _ in "ab"]
            record("21.4", "`tune --address 127.0.0.1:PORT` of a `ray start` cluster (token "
                   "authentication on) without its token, twice",
                   f"exits {[c for c, _ in tries]}: `{tries[1][1]}`; search.yaml left: "
                   f"{(target / 'search.yaml').exists()}",
                   [c for c, _ in tries] == [2, 2] and "RAY_AUTH_MODE=token" in tries[1][1]
                   and not (target / "search.yaml").exists())  # fmt: skip
        finally:
            stop_cluster(str(ray_tmp))
    with read_only_mount(work / "ro") as mount:
        if mount is None:
            record("21.12", "`tune --output-dir` on a read-only file system", "not run", True)
        else:
            code, line = kinfonce("tune", *TUNE, "--output-dir", str(mount / "search"))
            record("21.12", "`tune --output-dir` on a read-only file system",
                   f"exit {code}: `{line}`", code == 2 and "Traceback" not in line)  # fmt: skip


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A tmpfs at ``mount`` with mount ``options`` for the block (None without root)."""
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def read_only_mount(mount: Path):
    """A read-only tmpfs at ``mount`` (None without root)."""
    return tmpfs(mount, "ro,size=1m")


def fill(mount: Path) -> None:
    """Write a file into ``mount`` until its file system is full."""
    with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()


def drill_full_small(work: Path) -> None:
    """Point 12: the lock file and the cache on a full disk."""
    with tmpfs(work / "full-lock", "size=1m") as mount:
        if mount is None:
            record("21.12", "full disk", "not run (needs root to mount)", True)
            return
        fill(mount)
        code, line = kinfonce("pretrain", *TINY, "--output-dir", str(mount / "run"))
        record("21.12", "full disk when the run writes its .lock",
               f"exit {code}: `{line}`; directory left: {(mount / 'run').exists()}",
               code == 2 and not (mount / "run").exists())  # fmt: skip
    with tmpfs(work / "full-cache", "size=256k") as mount:
        tree = work / "big.zip"
        write_tree(tree, ("cat", "dog", "emu", "fox"), {})  # 200 images: 600 KiB decoded
        proc = start("pretrain", *TINY, "--dataset", f"imagefolder:{tree}", "--epochs", "1",
                     "--output-dir", str(work / "full-cache-run"),
                     extra_env={"KINFONCE_CACHE": str(mount)})  # fmt: skip
        code, line = finish(proc)
        # since issue 25 the cache is the data's only copy: a disk without room for it is
        # refused before decoding, naming both sizes
        record("21.12", "cache on a full disk (256 KiB tmpfs, 600 KiB to cache)",
               f"exit {code}: `{line}`", code == 2 and "Traceback" not in line)  # fmt: skip


def drill_ddp_start(work: Path) -> None:
    """Point 5: one process of a 2-process world, the other never comes."""
    run = work / "lonely"
    args = ["pretrain", *TINY, "--accelerator", "cpu", "--strategy", "ddp", "--num-nodes", "2",
            "--ddp-timeout", "5", "--output-dir", str(run)]  # fmt: skip
    ddp_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + random.randrange(300)),
               "NODE_RANK": "0"}  # fmt: skip
    began = time.perf_counter()
    code, line = kinfonce(*args, extra_env=ddp_env)
    spent = time.perf_counter() - began
    left = sorted(p.name for p in run.iterdir())
    again, again_line = kinfonce(*args, extra_env=ddp_env)
    record("21.5", "DDP start (--num-nodes 2, --ddp-timeout 5) whose other node never comes; "
           "then the same command again",
           f"exit {code} after {spent:.0f} s: `{line}`; left {left}; the rerun: exit {again}, "
           f"same error: {again_line == line}",
           code == 2 and left == [".lock"] and again_line == line)  # fmt: skip


def drill_moved_run(work: Path) -> None:
    """Point 6: kill -9 after epoch 0, move the directory, resume."""
    from kinfonce.checkpoints import load_checkpoint

    run, moved = work / "to-move", work / "moved"
    args = ["pretrain", *TINY, "--epochs", "4"]
    proc = start(*args, "--output-dir", str(run))
    wait_for(has_epoch(run, 0), proc)
    proc.kill()
    proc.wait()
    shutil.move(run, moved)
    code, _ = kinfonce(*args, "--output-dir", str(moved), "--resume")
    with (moved / "logs" / "metrics.csv").open() as file:
        probes = [float(r["probe_top1"]) for r in csv.DictReader(file) if r.get("probe_top1")]
    best = load_checkpoint(moved / "checkpoints" / "best.ckpt")["epoch"]
    record("21.6", "kill -9 after epoch 0, move the run directory, --resume to epoch 3",
           f"exit {code}; probe per epoch {[round(p, 3) for p in probes]}; best.ckpt is epoch "
           f"{best} (the first best: {best == probes.index(max(probes))}; the bug is seen when "
           "epoch 1 scores below epoch 0)", code == 0 and best == probes.index(max(probes)))  # fmt: skip


def drill_signals(work: Path) -> None:
    """Point 7: SIGTERM and SIGINT in training, SIGTERM in the final evaluation."""
    for name, signum, expected in (
        ("SIGTERM", signal.SIGTERM, 143),
        ("SIGINT", signal.SIGINT, 130),
    ):
        run = work / f"sig-{name}"
        args = ["pretrain", *TINY, "--epochs", "4", "--output-dir", str(run)]
        proc = start(*args)
        wait_for(has_epoch(run, 0), proc)
        proc.send_signal(signum)
        code, line = finish(proc)
        saved = (run / "checkpoints" / "interrupted.ckpt").is_file()
        resumed, _ = kinfonce(*args, "--resume")
        record("21.7", f"{name} during training",
               f"exit {code}: `{line}`; interrupted.ckpt written: {saved}; --resume exit "
               f"{resumed}, log epochs {log_epochs(run)}",
               code == expected and saved and resumed == 0 and log_epochs(run) == [0, 1, 2, 3])  # fmt: skip
    run = work / "sig-eval"
    proc = start("pretrain", *TINY, "--epochs", "1", "--eval-linear-epochs", "30000",
                 "--output-dir", str(run))  # fmt: skip
    wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file(), proc)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    code, line = finish(proc)
    record("21.7", "SIGTERM during the final evaluation", f"exit {code}: `{line}`; metrics.json: "
           f"{(run / 'metrics.json').is_file()}", code == 143)  # fmt: skip


def drill_round_two_data(work: Path) -> None:
    """Points 8-11, 13, 14, 15 and 16: data, settings and eval."""
    import torch

    cache = {"KINFONCE_CACHE": str(work / "cache2")}
    dead = work / "dead-dog.zip"
    write_tree(dead, ("cat", "dog"), {})
    with zipfile.ZipFile(dead) as source:
        members = {i.filename: source.read(i) for i in source.infolist()}
    with zipfile.ZipFile(dead, "w", zipfile.ZIP_STORED) as out:
        for member, data in members.items():
            out.writestr(member, b"garbage" if "/dog/" in member else data)
    code, line = kinfonce("pretrain", *TINY, "--dataset", f"imagefolder:{dead}", "--output-dir",
                          str(work / "dead-run"), extra_env=cache)  # fmt: skip
    record("21.8", "2-class tree whose every `dog` image (train and test) is garbage bytes",
           f"exit {code}: `{line}`", code == 2 and "'dog'" in line)  # fmt: skip
    stored = work / "stored.zip"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as out:
        for member, data in members.items():
            out.writestr(member, data)
        bmp = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(bmp, format="BMP")
        out.writestr("train/cat/zz.bmp", bmp.getvalue())
    raw = bytearray(stored.read_bytes())
    with zipfile.ZipFile(stored) as zipped:
        info = zipped.getinfo("train/cat/zz.bmp")
    raw[
        info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size - 9
    ] ^= 0xFF
    stored.write_bytes(bytes(raw))
    proc = start("pretrain", *TINY, "--dataset", f"imagefolder:{stored}", "--epochs", "1",
                 "--output-dir", str(work / "stored-run"), extra_env=cache)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    named = "zz.bmp (BadZipFile: Bad CRC-32" in err
    record("21.10", "corrupt pixel bytes in a stored (uncompressed) BMP member",
           f"exit {proc.returncode}; skipped and named: {named}",
           proc.returncode == 0 and named)  # fmt: skip
    config = work / "typed.yaml"
    config.write_text("epochs: true\nseed: false\n")
    code, line = kinfonce("pretrain", "--config", str(config), "--output-dir", str(work / "typed"))
    record("21.9", "YAML `epochs: true`, `seed: false`", f"exit {code}: `{line}`",
           code == 2 and not (work / "typed").exists())  # fmt: skip
    entries = [p for p in (work / "cache2").iterdir() if p.name.startswith("imagefolder-stored")]
    marker = work / "cache-code-ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    # an object array: np.save pickles it, and unpickling it would run the command
    np.save(entries[0] / "labels.npy", np.array([RunsCode()], dtype=object), allow_pickle=True)
    proc = start("pretrain", *TINY, "--dataset", f"imagefolder:{stored}", "--epochs", "1",
                 "--output-dir", str(work / "stored-run2"), extra_env=cache)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    rebuilt = "removing unreadable cache entry" in err
    record("21.11", "cache entry whose labels.npy is a pickle calling os.system",
           f"exit {proc.returncode}; entry removed and rebuilt: {rebuilt}; code ran: "
           f"{marker.exists()}", proc.returncode == 0 and rebuilt and not marker.exists())  # fmt: skip
    with read_only_mount(work / "ro-cache") as mount:
        if mount is not None:
            proc = start("pretrain", *TINY, "--dataset", f"imagefolder:{stored}", "--epochs", "1",
                         "--output-dir", str(work / "ro-run"),
                         extra_env={"KINFONCE_CACHE": str(mount)})  # fmt: skip
            _, err = proc.communicate(timeout=600)
            warned = "cannot write its cache entry" in err
            record("21.12", "cache on a read-only file system",
                   f"exit {proc.returncode}; warned and ran uncached: {warned}",
                   proc.returncode == 0 and warned)  # fmt: skip
    run = work / "holes"  # drill_eval_holes' run
    if not run.is_dir():
        kinfonce("pretrain", *TINY, "--epochs", "1", "--output-dir", str(run))
    ckpt = run / "checkpoints" / "last.ckpt"
    code, line = kinfonce("eval", str(ckpt), "--device", "cuda", "--output-dir", str(work / "ev"))
    record("21.13", "`eval --device cuda` on a machine without a GPU", f"exit {code}: `{line}`",
           code == 2 and not (work / "ev").exists())  # fmt: skip
    bad = os.fsencode(work) + b"/bad\xffname"
    proc = subprocess.Popen([sys.executable, "-m", "kinfonce.cli", "pretrain", *TINY,
                             b"--output-dir", bad], env=env(), stderr=subprocess.PIPE)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    last = err.decode(errors="replace").strip().splitlines()[-1]
    record("21.14", "--output-dir $'bad\\xffname'", f"exit {proc.returncode}: `{last}`",
           proc.returncode == 2 and not os.path.exists(bad))  # fmt: skip
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["kinfonce"]["config"]["backbone"] = "resnet18"
    torch.save(checkpoint, work / "other-backbone.ckpt")
    proc = start("eval", str(work / "other-backbone.ckpt"), "--output-dir", str(work / "ev2"))
    _, err = proc.communicate(timeout=600)
    record("21.15", "eval of a checkpoint whose weights are not its backbone's",
           f"exit {proc.returncode}, {len(err.strip().splitlines())} line(s): `{err.strip()[-150:]}`",
           proc.returncode == 2 and len(err.strip().splitlines()) == 1)  # fmt: skip
    cut = work / "cut.zip"
    cut.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    code, line = kinfonce("pretrain", *TINY, "--dataset", f"imagefolder:{cut}", "--output-dir",
                          str(work / "cut-run"), extra_env=cache)  # fmt: skip
    record("21.15", "a truncated zip", f"exit {code}: `{line}`", code == 2 and "truncated" in line)
    code, line = kinfonce("eval", str(run))
    record("21.15", "a run directory given as the checkpoint", f"exit {code}: `{line}`",
           code == 2 and "is a directory" in line)  # fmt: skip
    tree = work / "sizes"
    for split, count, side in (("train", 20, 32), ("test", 5, 32), ("unlabelled", 40, 48)):
        for c, name in enumerate(("cat", "dog")):
            folder = tree / split / name if split != "unlabelled" else tree / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{name}{i}.jpg").write_bytes(
                    image_bytes((side, side), "JPEG", 100 * c + i)
                )
    sized = work / "sized-run"
    code, _ = kinfonce("pretrain", *TINY, "--dataset", f"imagefolder:{tree}", "--unlabeled",
                       "--train-subset", "none", "--epochs", "1", "--output-dir", str(sized),
                       extra_env=cache)  # fmt: skip
    evaluated, line = kinfonce("eval", str(sized / "checkpoints" / "last.ckpt"), "--no-progress",
                               "--map-points", "0", extra_env=cache)  # fmt: skip
    record("21.16", "eval of a run pretrained with --unlabeled on 48 px unlabelled beside 32 px "
           "labelled images", f"pretrain exit {code}; eval exit {evaluated}",
           code == 0 and evaluated == 0)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--skip-ddp", action="store_true", help="skip the 2-process DDP drill")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these drills")
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kinfonce-drills-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DRILL_WORK"] = str(work)
    drills = {
        "two_processes": lambda: drill_two_processes(work),
        "run_files": lambda: drill_run_files(work),
        "kill_storm": lambda: drill_kill_storm(work),
        "full_disk": lambda: drill_full_disk(work),
        "copied_times": lambda: drill_copied_times(work),
        "two_kills": lambda: drill_two_kills(work),
        "bad_values": lambda: drill_bad_values(work),
        "image_trees": lambda: drill_image_trees(work),
        "eval_holes": lambda: drill_eval_holes(work),
        "library": drill_library,
        "ddp": lambda: drill_ddp(work),
        "tune_driver": lambda: drill_tune_driver(work),
        "tune_directory": lambda: drill_tune_directory(work),
        "ddp_start": lambda: drill_ddp_start(work),
        "moved_run": lambda: drill_moved_run(work),
        "signals": lambda: drill_signals(work),
        "round_two_data": lambda: drill_round_two_data(work),
        "full_small": lambda: drill_full_small(work),
    }
    chosen = args.only or [name for name in drills if not (args.skip_ddp and name == "ddp")]
    began = time.perf_counter()
    for name in chosen:
        drills[name]()
    print("\n| case | fault | outcome | as expected |\n| --- | --- | --- | --- |")
    for case, fault, outcome, ok in ROWS:
        print(f"| {case} | {fault} | {outcome.replace('|', '/')} | {'yes' if ok else '**no**'} |")
    passed = sum(ok for *_, ok in ROWS)
    print(
        f"\nRESULT drills={len(ROWS)} as_expected={passed} wall_s={time.perf_counter() - began:.0f}"
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
