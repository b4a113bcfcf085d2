"""nanochat.download: a real HTTP server on 127.0.0.1 that fails, truncates, lies and goes missing.

The server serves small shards built in the test under the published names (shard_00000.parquet ...,
shard_01822.parquet = FineWeb-Edu's validation shard) and follows a per-file script of misbehaviours, so the
downloader's retries, checks and skips are exercised over real sockets, with backoff delays of a millisecond.
"""

import os
import re
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from nanochat.dataset import DatasetError, iter_documents
from nanochat.download import download_shards, main

VAL = "shard_01822.parquet"  # FineWeb-Edu's last shard, saved locally as val_01822.parquet
FAST = dict(backoff_s=0.001, timeout_s=10)
FINEWEB = dict(source="fineweb-edu", **FAST)  # the served layout is FineWeb-Edu's (validation shard 1822)


class ShardServer:
    """A threaded HTTP server over `files` (name -> bytes); `script[name]` lists misbehaviours, one a request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.script: dict[str, list[str]] = defaultdict(list)
        self.requests: Counter = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                owner.requests[name] += 1
                action = owner.script[name].pop(0) if owner.script[name] else "serve"
                body = owner.files.get(name)
                if action == "reset":  # SO_LINGER 0: close() sends a TCP RST instead of a FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if body is None:
                    self.send_error(404)
                    return
                if action == "500":
                    self.send_error(500)
                    return
                send, length = {
                    "serve": (body, len(body)),
                    "cut-with-full-length": (body[: len(body) // 2], len(body)),  # the connection closes early
                    "cut-no-length": (body[:-100], None),  # only the parquet check can tell
                    "cut-honest-length": (body[:-8], len(body) - 8),  # the length matches a body with no footer
                    "corrupt-page": (corrupt(body), len(body)),  # whole, footer intact, a page header garbled
                }[action]
                self.send_response(200)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(send)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        # Polling every 50 ms rather than 500 ms: shutdown() waits for one poll.
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def corrupt(body: bytes) -> bytes:
    offset = pq.ParquetFile(pa.BufferReader(body)).metadata.row_group(1).column(0).data_page_offset
    return body[:offset] + bytes(b ^ 0xFF for b in body[offset : offset + 8]) + body[offset + 8 :]


def shard_bytes(path, texts) -> bytes:
    pq.write_table(pa.table({"text": texts}), path, row_group_size=16, compression="zstd")
    return path.read_bytes()


@pytest.fixture
def server(tmp_path, wiki_docs):
    source_dir = tmp_path / "served"
    source_dir.mkdir()
    files = {
        f"shard_{i:05d}.parquet": shard_bytes(source_dir / f"{i}.parquet", wiki_docs[i * 40 : (i + 1) * 40])
        for i in range(4)
    }
    files[VAL] = shard_bytes(source_dir / "val.parquet", wiki_docs[-20:])
    srv = ShardServer(files)
    yield srv
    srv.close()


def assert_local_copy(out_dir, server, names):
    for name in names:
        local = "val_01822.parquet" if name == VAL else name
        assert (out_dir / local).read_bytes() == server.files[name], local


def test_retries_and_checks_end_with_every_shard_valid(tmp_path, server):
    server.script["shard_00000.parquet"] = ["500", "500"]
    server.script["shard_00001.parquet"] = ["reset"]
    server.script["shard_00002.parquet"] = ["cut-with-full-length", "cut-no-length"]
    server.script["shard_00003.parquet"] = ["cut-honest-length", "corrupt-page"]
    server.script[VAL] = ["cut-no-length"]
    out_dir = tmp_path / "base_data"
    summary = download_shards(4, out_dir=str(out_dir), base_url=server.url, workers=3, **FINEWEB)
    assert sorted(summary.fetched) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet",
                                       "shard_00003.parquet", "val_01822.parquet"]  # fmt: skip
    assert server.requests == {"shard_00000.parquet": 3, "shard_00001.parquet": 2, "shard_00002.parquet": 3,
                               "shard_00003.parquet": 3, VAL: 2}  # fmt: skip
    assert_local_copy(out_dir, server, server.files)
    assert sorted(os.listdir(out_dir)) == ["SOURCE", *sorted(summary.fetched)]  # no temp file left behind
    assert (
        list(iter_documents([str(out_dir)], "val")) == pq.read_table(out_dir / "val_01822.parquet")["text"].to_pylist()
    )


def test_rerun_skips_valid_shards_and_refetches_a_corrupt_one(tmp_path, server, capsys):
    out_dir = tmp_path / "base_data"
    download_shards(3, out_dir=str(out_dir), base_url=server.url, **FINEWEB)
    assert sum(server.requests.values()) == 4
    capsys.readouterr()  # only the second run's output matters
    good = (out_dir / "shard_00001.parquet").read_bytes()
    (out_dir / "shard_00001.parquet").write_bytes(good[: len(good) // 3])  # a truncated file on disk
    summary = download_shards(4, out_dir=str(out_dir), base_url=server.url, **FINEWEB)
    assert sorted(summary.fetched) == ["shard_00001.parquet", "shard_00003.parquet"]
    assert sorted(summary.skipped) == ["shard_00000.parquet", "shard_00002.parquet", "val_01822.parquet"]
    assert server.requests["shard_00001.parquet"] == 2 and server.requests["shard_00000.parquet"] == 1
    assert "shard_00001.parquet is not a readable parquet file" in capsys.readouterr().out
    assert_local_copy(out_dir, server, server.files)


def test_missing_shard_is_a_clear_404(tmp_path, server):
    with pytest.raises(DatasetError, match=r"shard_00004.parquet: not found \(HTTP 404\) at .*shard_00004.parquet"):
        download_shards(5, out_dir=str(tmp_path / "d"), base_url=server.url, **FINEWEB)
    assert server.requests["shard_00004.parquet"] == 1  # a 404 is not retried


def test_persistent_server_errors_give_up_after_the_attempts(tmp_path, server):
    server.script["shard_00000.parquet"] = ["500"] * 3
    with pytest.raises(DatasetError, match=r"shard_00000.parquet: giving up after 3 attempts \(HTTP 500"):
        download_shards(1, out_dir=str(tmp_path / "d"), base_url=server.url, attempts=3, **FINEWEB)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_connection_refused_says_network_unreachable_and_how_to_work_offline(tmp_path):
    with pytest.raises(DatasetError) as error:
        download_shards(2, out_dir=str(tmp_path / "d"), base_url=closed_port_url(), attempts=2, **FINEWEB)
    message = str(error.value)
    for hint in (
        "network unreachable",
        "--base-url",
        "NANOCHAT_DATA_URL",
        "nanochat.dataset build",
        "NANOCHAT_DATA_DIR",
    ):
        assert hint in message


def test_sources_are_never_mixed_in_one_directory(tmp_path, server):
    out_dir = tmp_path / "base_data"
    download_shards(1, out_dir=str(out_dir), base_url=server.url, **FINEWEB)
    assert (out_dir / "SOURCE").read_text() == "fineweb-edu\n"
    with pytest.raises(DatasetError, match="made by 'fineweb-edu'.*cannot be mixed"):
        download_shards(1, "climbmix", out_dir=str(out_dir), base_url=server.url, **FAST)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard_00000.parquet").write_bytes(b"x")
    with pytest.raises(DatasetError, match="unknown origin"):
        download_shards(1, out_dir=str(foreign), base_url=server.url, **FINEWEB)


def test_cli_downloads_from_the_mirror_in_nanochat_data_url(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    assert main(["-n", "2", "-w", "2", "--source", "fineweb-edu"]) == 0
    printed = capsys.readouterr().out
    assert "done: 3 shards fetched" in printed
    # A progress line a shard, with the ETA.
    assert len(re.findall(r"^download: [\d.]+% \(\d/3 shards, .* MB/s, .*\), .* ETA [\d.]+ min$", printed, re.M)) == 3
    assert_local_copy(tmp_path / "base_data", server, ["shard_00000.parquet", "shard_00001.parquet", VAL])
    assert main(["-n", "2", "--source", "fineweb-edu", "--base-url", closed_port_url()]) == 0  # all there: no network
    assert "0 shards fetched" in capsys.readouterr().out


def test_check_says_where_text_comes_from_or_what_to_do(tmp_path, server, monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    assert main(["--check", "--base-url", server.url]) == 0
    assert f"online: {server.url.rstrip('/')}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        main(["--check", "--base-url", closed_port_url()])
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert "cannot reach" in message and "NANOCHAT_DATA_DIR is not set" in message and "--base-url" in message
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["--check"])
    assert f"{tmp_path / 'pretrain'} does not exist" in capsys.readouterr().err
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "notes.txt").write_text("some text")
    assert main(["--check", "--base-url", closed_port_url()]) == 0  # offline: the network is not asked
    assert f"offline: {tmp_path / 'pretrain'}" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_errors_are_one_message_and_exit_1(tmp_path):
    """Real subprocesses, started together: each pays the torch import of nanochat.common (seconds)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    bad_gzip = tmp_path / "broken.jsonl.gz"
    bad_gzip.write_bytes(b"not gzip at all")
    commands = [
        ["nanochat.download", "-n", "1", "--attempts", "1", "--base-url", closed_port_url()],
        ["nanochat.dataset", "build", "--input", str(bad_gzip), "--out", str(tmp_path / "built")],
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )  # fmt: skip
        for args in commands
    ]
    (out_download, err_download), (out_build, err_build) = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [1, 1]
    assert "Traceback" not in err_download + err_build
    assert "download: error: network unreachable" in err_download and "--base-url" in err_download
    assert f"build: error: {bad_gzip} is not readable as gzip UTF-8 text" in err_build
    assert not [name for name in os.listdir(tmp_path) if "built" in name]  # no partial --out, no temp directory
