"""Frame accuracy of every decode backend (read back through the burned-in counters), decord's
seek trap on MPEG-4 B-frames, and the guarded child process (crash, hang, restart)."""
import numpy as np
import pytest

from data.video.backends import DecodeError, DecodeRequest, decode_frames, torchcodec_available
from data.video.isolation import GuardedWorker, WorkerFailure
from data.video.probe import check_decord_seeking, probe_video
from data.video.synthetic import VideoSpec, read_counter, write_video

CASES = {
    "h264_bframes_cfr": VideoSpec(n_frames=90, width=96, height=64, fps=15, gop=15, seed=1),
    "h264_vfr": VideoSpec(n_frames=50, width=96, height=64, fps=12, vfr=True, seed=2),
    "h264_rotated_90": VideoSpec(n_frames=40, width=64, height=96, fps=10, rotation=90, seed=3),
    "mpeg4_bframes_odd": VideoSpec(n_frames=40, width=65, height=49, fps=10, codec="mpeg4", seed=4),
}
BACKENDS = ["decord", "pyav", pytest.param("torchcodec", marks=pytest.mark.skipif(
    not torchcodec_available(), reason="torchcodec 0.13 not installed (optional backend; needs Debian ffmpeg)"))]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("dec")
    out = {}
    for name, spec in CASES.items():
        truth = write_video(d / f"{name}.mp4", spec)
        m = probe_video(str(d / f"{name}.mp4"), keep_thumbs=True)
        thumbs = m.pop("_thumbs")
        m["decord_seek_ok"] = check_decord_seeking(str(d / f"{name}.mp4"), thumbs, m["rotation"])
        out[name] = (str(d / f"{name}.mp4"), truth, m)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_frame_accuracy(videos, backend, case):
    path, truth, m = videos[case]
    n = truth["n_frames"]
    assert m["num_frames"] == n
    rng = np.random.default_rng(0)
    idx = sorted({0, n - 1, n // 2, *rng.choice(n, 12, replace=False).tolist()})
    H, W = (56, 84) if truth["width"] > truth["height"] else (84, 56)
    frames = decode_frames(backend, DecodeRequest(path=path, indices=idx, height=H, width=W, meta=m))
    assert frames.shape == (len(idx), H, W, 3) and frames.dtype == np.uint8
    got = [read_counter(f, truth["counter_bits"]) for f in frames]
    assert got == idx
    # the planar layout the loader asks for (PyAV makes it natively) holds the same pictures
    planar = decode_frames(backend, DecodeRequest(path=path, indices=idx, height=H, width=W, meta=m, layout="chw"))
    assert planar.shape == (len(idx), 3, H, W)
    # (swscale rounds planar and packed RGB differently: about one level apart)
    assert np.abs(planar.transpose(0, 2, 3, 1).astype(np.int16) - frames).mean() < 3.0


def test_decord_seek_trap_is_detected(videos):
    """decord's seeking returns wrong frames on MPEG-4 Part 2 with B-frames; ingest detects it and
    the decord backend then decodes that file with PyAV (test_frame_accuracy covers the result)."""
    path, truth, m = videos["mpeg4_bframes_odd"]
    assert m["decord_seek_ok"] is False
    assert videos["h264_bframes_cfr"][2]["decord_seek_ok"] is True
    assert videos["h264_vfr"][2]["decord_seek_ok"] is True


def test_decode_checks_requests_and_counts(videos):
    path, truth, m = videos["h264_bframes_cfr"]
    with pytest.raises(DecodeError, match="bad_request"):
        decode_frames("pyav", DecodeRequest(path=path, indices=[5, 3], height=56, width=84, meta=m))
    with pytest.raises(DecodeError, match="bad_request"):
        decode_frames("decord", DecodeRequest(path=path, indices=[0, 1000], height=56, width=84, meta=m))
    # metadata that claims more frames than the file has: the shortfall is detected, not padded
    lying = dict(m, num_frames=500, pts_runs=[[m["pts_runs"][0][0], m["pts_runs"][0][1], 500]])
    for backend in ("decord", "pyav"):
        with pytest.raises(DecodeError) as e:
            decode_frames(backend, DecodeRequest(path=path, indices=[10, 400], height=56, width=84, meta=lying))
        assert e.value.reason in ("short_video", "missing_frame", "short_decode")


def test_guarded_worker_survives_crash_and_hang(videos, tmp_path):
    path, truth, m = videos["h264_bframes_cfr"]
    w = GuardedWorker(log_dir=str(tmp_path))
    try:
        pid = w.call("ping", timeout_s=30)
        with pytest.raises(WorkerFailure) as e:
            w.call("_crash", timeout_s=30)
        assert e.value.reason == "crashed" and "SIGSEGV" in e.value.detail
        with pytest.raises(WorkerFailure) as e:
            w.call("_hang", timeout_s=0.5, seconds=60)
        assert e.value.reason == "timeout"
        with pytest.raises(WorkerFailure) as e:           # a job's own error keeps the child alive
            w.call("decode", timeout_s=30, backend="pyav", out_path=str(tmp_path / "x.rgb"),
                   path=str(tmp_path / "missing.mp4"), indices=[0], height=28, width=28, meta={})
        assert e.value.reason == "open_failed"
        shape = w.call("decode", timeout_s=30, backend="decord", out_path=str(tmp_path / "f.rgb"),
                       path=path, indices=[3, 4], height=56, width=84, meta=m)
        arr = np.fromfile(tmp_path / "f.rgb", np.uint8).reshape(shape)
        assert [read_counter(f, truth["counter_bits"]) for f in arr] == [3, 4]
        assert w.call("ping", timeout_s=30) != pid and w.num_starts == 3 and w.num_failures == 2
    finally:
        w.close()


def test_mpeg_ts_with_b_frames_decodes_the_frames_asked_for(tmp_path):
    """In MPEG-TS a seek to a keyframe's pts lands on the next keyframe, and the fallback's seek to the first
    frame's pts past the first GOP: every load of a B-frame .ts failed with missing_frame. The reference is the
    counter burned into each frame."""
    spec = VideoSpec(n_frames=48, width=96, height=64, fps=12, gop=12, seed=5)
    path = str(tmp_path / "bframes.ts")
    truth = write_video(path, spec)
    m = probe_video(path)
    assert m["container"] == "mpegts" and m["num_frames"] == 48, m
    for idx in ([0, 3, 7, 11], [3, 13, 26, 40, 47], [12, 24, 36], list(range(0, 48, 5))):
        frames = decode_frames("pyav", DecodeRequest(path=path, indices=idx, height=64, width=96, meta=m))
        assert [read_counter(f, truth["counter_bits"]) for f in frames] == idx


def test_a_fresh_childs_start_is_not_charged_to_the_job_after_a_timeout(videos, tmp_path, monkeypatch):
    """After a hang is killed (or a crash), the next job runs in a fresh child. Its start (python, numpy, the
    decoders' imports: about 0.5 s here, seconds on a loaded node) was charged to that job's deadline, so with a
    short timeout every later job failed as `timeout` too, each in another fresh child: an ingest at --timeout-s 0.4
    rejected every file after its first slow one, 3-12 ms files among them. The start is made slow here (a
    sitecustomize that sleeps 1 s, on the child's PYTHONPATH), longer than the jobs' deadline."""
    path, truth, m = videos["h264_bframes_cfr"]
    slow = tmp_path / "slow_start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(1.0)\n")
    monkeypatch.setenv("PYTHONPATH", str(slow))
    w = GuardedWorker(log_dir=str(tmp_path))
    try:
        assert w.call("ping", timeout_s=0.5) == w.proc.pid             # the start's second is not the ping's
        with pytest.raises(WorkerFailure) as e:
            w.call("_hang", timeout_s=0.5, seconds=60)
        assert e.value.reason == "timeout" and e.value.detail == "_hang took longer than 0.5 s; child killed"
        shape = w.call("decode", timeout_s=0.5, backend="pyav", out_path=str(tmp_path / "f.rgb"),
                       path=path, indices=[3, 4], height=56, width=84, meta=m)
        arr = np.fromfile(tmp_path / "f.rgb", np.uint8).reshape(shape)
        assert [read_counter(f, truth["counter_bits"]) for f in arr] == [3, 4]
        assert w.num_starts == 2 and w.num_failures == 1
    finally:
        w.close()


def test_a_child_ends_with_the_process_that_started_it(tmp_path):
    """A DataLoader worker killed outright (SIGKILL; a launch's rank 1 worker, in tests/dist/test_data_workers.py's
    way) while its guarded child decoded a file that hangs: the child stayed, orphaned, until its decode ended
    (3600 s for KEYE_DECODE_FAULT=hang). It now dies with its parent."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = ("import sys\n"
              "from data.video.isolation import GuardedWorker\n"
              "w = GuardedWorker()\n"
              "print(w.call('ping', timeout_s=60), flush=True)\n"
              "w.call('_hang', timeout_s=600, seconds=60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)                       # the hang has begun
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while Path(f"/proc/{child}").exists() and time.time() < deadline:
            if Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break                         # dead, waiting for init to reap it
            time.sleep(0.1)
        alive = Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] != "Z"
    finally:
        if parent.poll() is None:
            parent.kill()
    if alive:
        os.kill(child, signal.SIGKILL)        # this test's own orphan
    assert not alive, f"the guarded child {child} outlived its parent by 10 s"


def test_a_decode_out_of_memory_is_not_called_a_broken_file(tmp_path):
    """A 2^28-pixel image (16384 x 16384, the most ingest accepts) decoded in a child short of memory (its address
    space capped at what it holds plus 100 MB, with prlimit; the decode needs 256 MB): Pillow's MemoryError was
    reported as the file's `decode_error`, so ingest recorded a good image as broken and its reruns skipped it. It is
    `out_of_memory` now, the file not blamed, and the child serves on."""
    import resource
    from pathlib import Path

    from PIL import Image

    big = tmp_path / "big.png"
    a = np.zeros((1 << 14, 1 << 14), np.uint8)
    a[::97] = 255
    Image.fromarray(a).save(big, compress_level=1)
    del a
    w = GuardedWorker(log_dir=str(tmp_path))
    try:
        assert w.call("inspect_image", timeout_s=120, path=str(big))["width"] == 1 << 14   # with memory: accepted
        pid = w.call("ping", timeout_s=30)
        status = Path(f"/proc/{pid}/status").read_text()
        held = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:"))) << 10
        resource.prlimit(pid, resource.RLIMIT_AS, (held + (100 << 20), resource.RLIM_INFINITY))
        with pytest.raises(WorkerFailure) as e:
            w.call("inspect_image", timeout_s=120, path=str(big))
        assert e.value.reason == "out_of_memory" and e.value.detail.startswith("inspect_image: MemoryError"), \
            (e.value.reason, e.value.detail)
        assert w.call("ping", timeout_s=30) == pid      # the same child serves on
    finally:
        w.close()
