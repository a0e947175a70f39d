"""download_sample_data.py against a real local HTTP server that pages, fails and stalls."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

import download_sample_data as dl
from pepemb import data
from pepemb.cli import UserError

REPO = Path(__file__).resolve().parent.parent
PAGE, PAGES = 10, 4
LETTERS = "ACDEFGHIKLMNPQRSTVWY"
# 40 distinct UniRef50-like records, 30-69 residues.
RECORDS = [
    (f"UniRef50_T{i:03d}", "M" + "".join(LETTERS[(i * 7 + j * j) % 20] for j in range(29 + i)))
    for i in range(PAGE * PAGES)
]
FAST = ["--retries", "3", "--backoff", "0.01"]
ENDLESS_CAP = 96 * 2**20  # where the endless page gives up, should a client read on and on


class FakeUniProt(BaseHTTPRequestHandler):
    """Pages of RECORDS at /uniref/search?cursor=k with Link headers; faults from server.faults."""

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        cursor = int(query.get("cursor", ["0"])[0])
        fault = self.server.faults.get(cursor, []).pop(0) if self.server.faults.get(cursor) else None
        self.server.log.append((cursor, query, fault))
        try:
            if url.path == "/html/uniref/search":
                return self.reply(200, "<html><body>Sign in to the proxy</body></html>")
            if url.path == "/empty/uniref/search":
                return self.reply(200, "")
            if url.path != "/uniref/search":
                return self.reply(404, "not found")
            if fault == "500":
                return self.reply(500, "internal error")
            if fault == "429":
                return self.reply(429, "slow down", {"Retry-After": "0"})
            if fault == "429-an-hour":
                return self.reply(429, "slow down", {"Retry-After": "3600"})
            if fault == "429-a-date":
                return self.reply(429, "slow down", {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
            if fault == "endless":
                return self.stream_endlessly()
            if fault == "slow":
                time.sleep(1.5)
            page = RECORDS[cursor * PAGE : (cursor + 1) * PAGE]
            headers = {}
            if cursor + 1 < PAGES:
                host, port = self.server.server_address
                headers["Link"] = f'<http://{host}:{port}/uniref/search?cursor={cursor + 1}&size={PAGE}>; rel="next"'
            body = "".join(f">{id_} n=1\n{seq}\n" for id_, seq in page)
            if fault == "streamed":
                return self.reply(200, body, headers, content_length=False)
            self.reply(200, body, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a stalled page, as intended

    def reply(self, status, body, headers=(), content_length=True):
        """Without content_length, the body is sent in pieces and ends where the connection
        closes (HTTP/1.0): the client learns its size only by reading it."""
        payload = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        if content_length:
            self.send_header("Content-Length", str(len(payload)))
        for key, value in dict(headers).items():
            self.send_header(key, value)
        self.end_headers()
        for start in range(0, len(payload), 100) if not content_length else ():
            self.wfile.write(payload[start : start + 100])
            self.wfile.flush()
        if content_length:
            self.wfile.write(payload)

    def stream_endlessly(self):
        """A FASTA body with no Content-Length that goes on until the client hangs up (or
        ENDLESS_CAP bytes); server.sent says how much was sent."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        record, sent = b">UniRef50_X n=1\n" + b"M" * 65_000 + b"\n", 0
        try:
            while sent < ENDLESS_CAP:
                self.wfile.write(record)
                sent += len(record)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.server.sent = sent
            self.server.stream_ended.set()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeUniProt)
    httpd.daemon_threads = True
    httpd.faults, httpd.log = {}, []
    httpd.sent, httpd.stream_ended = None, threading.Event()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def all_sequences(out):
    return sorted((p.id, p.sequence) for part in data.load_splits(out).values() for p in part)


def test_download_recovers_from_500_and_stalled_page(server, tmp_path):
    server.faults = {1: ["500"], 2: ["slow"]}
    out = tmp_path / "split"
    dl.main(["--output_dir", str(out), "--num_sequences", "25", "--base_url", server.url, "--timeout", "0.5", *FAST])

    assert all_sequences(out) == sorted(RECORDS[:25])  # the first 25, nothing lost or repeated
    assert [(cursor, fault) for cursor, _, fault in server.log] == [
        (0, None),
        (1, "500"),
        (1, None),
        (2, "slow"),
        (2, None),
    ]  # stops once 25 are in
    first_query = server.log[0][1]
    assert first_query == {"query": ["(identity:0.5) AND (length:[30 TO 1000])"], "format": ["fasta"], "size": ["25"]}
    assert len(data.read_fasta(out / "uniref50.fasta")) == 30  # whole pages are kept raw
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == server.url and stats["seed"] == 42
    assert stats["read_stats"]["selected"] == 25
    assert {k: v["count"] for k, v in stats["splits"].items()} == {"train": 21, "val": 2, "test": 2}
    assert stats["splits"]["val"]["length_min"] >= 30
    assert sorted(f.name for f in out.iterdir()) == [
        "stats.json",
        "test.fasta",
        "train.fasta",
        "uniref50.fasta",
        "val.fasta",
    ]


def test_download_gives_up_after_retries(server, tmp_path):
    server.faults = {0: ["500"] * 3}
    with requests.Session() as session, pytest.raises(dl.ApiUnreachable, match="HTTP 500 after 3"):
        dl.fetch_page(session, f"{server.url}/uniref/search", None, 1.0, retries=2, backoff=0.01)


def test_retry_after_is_honoured(server):
    server.faults = {0: ["429"]}
    start = time.monotonic()
    with requests.Session() as session:
        text, next_url = dl.fetch_page(session, f"{server.url}/uniref/search", None, 5.0, retries=1, backoff=30.0)
    assert time.monotonic() - start < 10  # Retry-After: 0 beat the 30 s backoff
    assert text.startswith(f">{RECORDS[0][0]}") and next_url.endswith("cursor=1&size=10")


def test_retry_after_is_capped_at_60_s_and_a_date_falls_back_to_the_backoff(server, monkeypatch):
    server.faults = {0: ["429-an-hour", "429-a-date", "429"]}
    slept = []
    monkeypatch.setattr(dl.time, "sleep", slept.append)  # the waits, without waiting
    with requests.Session() as session:
        text, _ = dl.fetch_page(session, f"{server.url}/uniref/search", None, 5.0, retries=3, backoff=2.0)
    assert text.startswith(f">{RECORDS[0][0]}")
    # an hour asked: 60 s (MAX_RETRY_AFTER_S); an HTTP date: the own backoff, 2 s x 2 at the
    # second attempt; 0 asked: 0
    assert slept == [60.0, 4.0, 0.0]
    assert [fault for _, _, fault in server.log] == ["429-an-hour", "429-a-date", "429", None]


def test_a_page_without_content_length_is_read_whole_or_refused_once_over_the_limit(server, monkeypatch):
    server.faults = {0: ["streamed"], 1: ["endless"]}
    with requests.Session() as session:
        streamed, next_url = dl.fetch_page(session, f"{server.url}/uniref/search", None, 5.0, retries=0, backoff=0)
        assert streamed == "".join(f">{id_} n=1\n{seq}\n" for id_, seq in RECORDS[:PAGE])
        monkeypatch.setattr(dl, "MAX_PAGE_BYTES", 2**18)
        with pytest.raises(UserError, match="sent a page over 262,144 bytes"):
            dl.fetch_page(session, next_url, None, 5.0, retries=0, backoff=0)
    assert server.stream_ended.wait(30)
    # It stopped reading at the limit: what the server got out is the limit plus what the
    # sockets' buffers took (a few MB), not the whole 96 MiB.
    assert 2**18 < server.sent < 32 * 2**20, server.sent


@pytest.mark.parametrize(
    "base,expected",
    [("/nothing", "HTTP 404"), ("/html", "did not answer with FASTA"), ("/empty", "no UniRef50 clusters of 30-1000")],
)
def test_wrong_server_is_a_user_error(server, tmp_path, base, expected):
    out = tmp_path / "split"
    with pytest.raises(UserError, match=expected):
        dl.main(["--output_dir", str(out), "--base_url", server.url + base, *FAST])
    assert not (out / "uniref50.fasta").exists()


def test_oversized_page_is_refused(server, monkeypatch):
    monkeypatch.setattr(dl, "MAX_PAGE_BYTES", 100)
    with requests.Session() as session, pytest.raises(UserError, match="over 100 bytes"):
        dl.fetch_page(session, f"{server.url}/uniref/search", None, 5.0, retries=0, backoff=0)


def test_offline_fallback_uses_the_shipped_sample(tmp_path, capsys):
    url = closed_port_url()
    fallback, offline = tmp_path / "fallback", tmp_path / "offline"
    dl.main(
        [
            "--output_dir",
            str(fallback),
            "--num_sequences",
            "200",
            "--base_url",
            url,
            "--retries",
            "1",
            "--backoff",
            "0.01",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url in err[0] and "unreachable" in err[0]
    assert "data/uniprot_sample.fasta" in err[0]

    dl.main(["--output_dir", str(offline), "--num_sequences", "200", "--offline"])
    for name in ("train.fasta", "val.fasta", "test.fasta", "stats.json"):
        assert (fallback / name).read_bytes() == (offline / name).read_bytes()
    shipped = {(p.id, p.sequence) for p in data.read_fasta(data.SHIPPED_UNIPROT)}
    chosen = all_sequences(offline)
    assert len(chosen) == 200 and set(chosen) <= shipped
    assert all(30 <= len(seq) <= 1000 for _, seq in chosen)
    assert json.loads((offline / "stats.json").read_text())["source"] == "data/uniprot_sample.fasta"


def test_antibody_preset(tmp_path):
    out = tmp_path / "ab"
    dl.main(["--output_dir", str(out), "--offline", "--preset", "antibody", "--num_sequences", "50"])
    antibodies = {(p.id, p.sequence) for p in data.read_fasta(data.SHIPPED_ANTIBODIES)}
    assert set(all_sequences(out)) <= antibodies and len(all_sequences(out)) == 50


def test_input_fasta_is_a_seeded_file_ordered_sample(tmp_path):
    source = tmp_path / "mine.fasta"
    records = [data.Protein(f"P{i}", "", "MK" * (5 + i)) for i in range(60)]  # 10..128 residues
    data.write_fasta(source, records)
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        dl.main(
            [
                "--output_dir",
                str(out),
                "--input_fasta",
                str(source),
                "--num_sequences",
                "20",
                "--min_length",
                "20",
                "--max_length",
                "100",
                "--seed",
                seed,
                "--base_url",
                closed_port_url(),
            ]
        )
        runs[name] = data.load_splits(out)
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    eligible = [p for p in records if 20 <= len(p.sequence) <= 100]
    for part in runs["a"].values():
        assert part == sorted(part, key=eligible.index)  # file order kept within each split
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["source"] == str(source)
    assert stats["read_stats"] == {
        "records": 60,
        "kept": 55,
        "too_short": 5,
        "duplicates": 0,
        "rare_to_x": 0,
        "too_long": 14,
        "selected": 20,
    }


def test_cli_takes_the_api_url_from_the_environment(server, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PEPEMB_UNIPROT_URL": server.url}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "download_sample_data.py"),
            "--output_dir",
            str(out),
            "--num_sequences",
            "40",
            "--seed",
            "7",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [cursor for cursor, _, _ in server.log] == [0, 1, 2, 3]
    assert all_sequences(out) == sorted(RECORDS)
    assert f"train 32, val 4, test 4 sequences from {server.url}" in result.stdout
