"""S3 from a user's side, against the session's moto server on loopback: models and held-out
data read from ``s3://``, one clear line for a missing bucket or a dead endpoint, and
throttling answered by retries (a loopback proxy in front of moto answers ``503 SlowDown``).
The multi-node runs with everything on S3 are in ``test_multinode.py``."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import boto3
import pytest

from hybridray import storage

from conftest import REPO, heldout_subset

HYBRIDRAY = str(REPO / ".venv" / "bin" / "hybridray")


def cli(*args, **env):
    return subprocess.run([HYBRIDRAY, *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = f"s3test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_eval_reads_a_model_and_its_data_from_s3(bucket, tmp_path, mlqa_prepared):
    from hybridray.models import resolve_model_path

    storage.copy_tree(resolve_model_path("builtin:tiny"), f"s3://{bucket}/models/tiny")
    heldout = heldout_subset(tmp_path / "heldout", mlqa_prepared, articles=3, langs=("de", "en"))
    storage.copy_tree(str(heldout), f"s3://{bucket}/heldout")
    common = ["--max-length", "32", "--no-progress"]
    remote = cli("eval", "--model", f"s3://{bucket}/models/tiny", "--data", f"lareqa:s3://{bucket}/heldout",
                 "--out", str(tmp_path / "remote"), *common)
    assert remote.returncode == 0, remote.stderr
    local = cli("eval", "--model", "builtin:tiny", "--data", f"lareqa:{heldout}", "--out", str(tmp_path / "local"), *common)
    assert local.returncode == 0, local.stderr
    got, want = (json.loads((tmp_path / d / "report.json").read_text())["summary"] for d in ("remote", "local"))
    assert got == want


@pytest.mark.parametrize("case", ["missing bucket", "dead endpoint"])
def test_unusable_storage_is_one_line_naming_the_uri(case, s3_server, mlqa_prepared, tmp_path):
    overrides = [f"data.train={mlqa_prepared / 'train'}", "data.heldout=''", "model.name_or_path=builtin:tiny",
                 "name=unreachable"]
    if case == "missing bucket":
        overrides.append("run.storage_path=s3://no-such-bucket/runs")
    else:
        overrides += ["run.storage_path=s3://anything/runs", f"run.s3_endpoint=http://127.0.0.1:{dead_port()}",
                      "run.storage_retry_s=2"]
    done = cli("train", "configs/local.yaml", *overrides)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    # one error line; before it, a dead endpoint says once that it is being retried (not a hang)
    notices = lines[:-1]
    assert notices == [] if case == "missing bucket" else (
        len(notices) == 1 and re.match(r"hybridray: storage: s3://anything/runs.*retrying for up to 2 s", notices[0])), \
        done.stderr
    assert lines[-1].startswith("hybridray: error: s3://"), done.stderr
    assert ("s3://no-such-bucket/runs" if case == "missing bucket" else "s3://anything/runs") in lines[-1]
    prepare = cli("data", "prepare", "--source", str(REPO.parent / "shared" / "data" / "mlqa-r"),
                  "--out", "s3://no-such-bucket/prepared")
    assert prepare.returncode == 2 and "s3://no-such-bucket/prepared" in prepare.stderr


class SlowDownProxy:
    """An HTTP relay in front of the S3 server that answers the first request of each kind
    (method and object path) with ``503 SlowDown``, as S3 does when throttling, and relays
    the later ones. One request per connection (``Connection: close`` both ways), so each request,
    retries included, is seen here."""

    BODY = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    RESPONSE = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.seen, self.refused = (host, int(port)), set(), 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    @staticmethod
    def _read_request(client) -> bytes:
        """One whole request (headers, then a Content-Length or chunked body), re-headed with
        ``Connection: close``."""
        buffer = bytearray()

        def need(n: int) -> bool:
            while len(buffer) < n:
                chunk = client.recv(65536)
                if not chunk:
                    return False
                buffer.extend(chunk)
            return True

        def line_end(start: int) -> int:
            while (end := buffer.find(b"\r\n", start)) < 0:
                if not need(len(buffer) + 1):
                    return -1
            return end

        head_end = buffer.find(b"\r\n\r\n")
        while head_end < 0:
            if not need(len(buffer) + 1):
                return b""
            head_end = buffer.find(b"\r\n\r\n")
        lines = [line for line in bytes(buffer[:head_end]).split(b"\r\n")
                 if not line.lower().startswith((b"connection:", b"expect:"))]
        headers = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip() for line in lines[1:]}
        start = head_end + 4
        if b"\r\nexpect: 100-continue" in bytes(buffer[:head_end]).lower():  # as S3 does (else the client
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")                 # waits 1 s to send the body)
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            position = start
            while True:  # chunk: size line, data, CRLF; the last one has size 0 and trailers
                end = line_end(position)
                size = int(bytes(buffer[position:end]).split(b";")[0], 16)
                position = end + 2
                if size == 0:
                    while (end := line_end(position)) != position:
                        position = end + 2
                    position += 2
                    break
                need(position + size + 2)
                position += size + 2
            body = bytes(buffer[start:position])
        else:
            need(start + int(headers.get(b"content-length", b"0")))
            body = bytes(buffer[start:])
        return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body

    def _handle(self, client):
        with client:
            request = self._read_request(client)
            if not request:
                return
            with self.lock:
                method, target = request.split(b"\r\n", 1)[0].split(b" ")[:2]
                line = (method, target.split(b"?")[0])
                refuse = line not in self.seen
                self.seen.add(line)
                self.refused += refuse
            if refuse:
                client.sendall(self.RESPONSE)
                return
            with socket.create_connection(self.upstream) as upstream:
                upstream.sendall(request)
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)

    def close(self):
        self.server.close()


def test_throttling_is_retried_with_backoff(s3_server, bucket, tmp_path, monkeypatch):
    proxy = SlowDownProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    storage._s3.cache_clear()
    try:
        (tmp_path / "tree" / "sub").mkdir(parents=True)
        for i in range(4):
            (tmp_path / "tree" / "sub" / f"f{i}.txt").write_text(f"file {i}")
        for i in range(6):
            storage.write_text(f"s3://{bucket}/throttled/t{i}.txt", f"text {i}")
        storage.copy_tree(str(tmp_path / "tree"), f"s3://{bucket}/throttled/tree")
        assert [storage.read_text(f"s3://{bucket}/throttled/t{i}.txt") for i in range(6)] == [f"text {i}" for i in range(6)]
        copied = Path(storage.local_copy(f"s3://{bucket}/throttled/tree"))
        assert (copied / "sub" / "f3.txt").read_text() == "file 3"
        assert proxy.refused >= 3  # the answers really were throttled, and every call succeeded
    finally:
        proxy.close()
        storage._s3.cache_clear()


def test_a_remote_run_log_reaches_s3_at_each_checkpoint_step_and_when_stopped(bucket):
    """A job stopped (or a driver lost) after a checkpoint and submitted again resumes from that
    checkpoint; the step records up to it must already be on S3, not only in the dead driver."""
    from hybridray.run_report import RunLog, read_history

    run = f"s3://{bucket}/runs/log"
    log = RunLog(run, sync_every=2)

    def steps_on_s3():
        return [h["step"] for h in read_history(run)]

    for step in (1, 2, 3):
        log.add({"step": step, "time": float(step), "loss": 1.0, "lr": 1e-5, "samples": 4, "batch_type": "mono"})
        assert steps_on_s3() == ([] if step == 1 else [1, 2])
    log.sync()  # what the driver does when it is stopped
    assert steps_on_s3() == [1, 2, 3]
    assert RunLog(run, start_step=2).history == [read_history(run)[0], read_history(run)[1]]


def test_ray_trains_filesystem_streams_a_download_in_retried_ranges(s3_server, bucket, tmp_path, monkeypatch):
    """What Ray Train downloads a checkpoint through (``storage.train_filesystem`` then
    ``pyarrow.fs.copy_files``): byte for byte equal, throttled reads retried, the retry budget
    carried by the filesystem itself (a Ray worker unpickles it), and a file read in ranges --
    never held in memory whole (a ZeRO optimizer state is GBs)."""
    import pickle

    import pyarrow as pa
    import pyarrow.fs as pafs

    blob = os.urandom(24 << 20)
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key="stream/state.pt", Body=blob)
    fs, path = storage.train_filesystem(f"s3://{bucket}/stream", budget_s=7.5)
    assert pickle.loads(pickle.dumps(fs)).handler.budget_s == 7.5

    peak, before = 0, pa.total_allocated_bytes()
    with fs.open_input_file(f"{path}/state.pt") as f:
        got = bytearray()
        while chunk := f.read(1 << 20):
            got += chunk
            peak = max(peak, pa.total_allocated_bytes() - before)
    assert bytes(got) == blob
    assert peak < 4 << 20, f"{peak} bytes held by Arrow while reading 1 MiB at a time"

    proxy = SlowDownProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    storage._s3.cache_clear()
    try:
        fs, path = storage.train_filesystem(f"s3://{bucket}/stream", budget_s=30)
        (tmp_path / "down").mkdir()  # as Ray Train makes it
        pafs.copy_files(path, str(tmp_path / "down"), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        assert (tmp_path / "down" / "state.pt").read_bytes() == blob
        assert proxy.refused >= 1
    finally:
        proxy.close()
        storage._s3.cache_clear()
