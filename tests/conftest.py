"""Tiny corpora and configs shared by the tests: everything runs on CPU in seconds, without network."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

VERSE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)
TINY_TEXT = VERSE * 40  # about 6 KB: structured enough that a tiny model's loss falls fast

# A model small enough that a Lightning fit of a few steps takes about a second.
TINY_MODEL_ARGS = [
    "--model.block_size=16",
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.n_embd=16",
    "--model.dropout=0.0",
    "--model.sample_tokens=20",
]


def tiny_fit_args(corpus_dir: Path, max_steps: int = 4, *extra: str) -> list[str]:
    """``fit`` of the tiny model on the tiny corpus: a validation every 2 steps, logs at every step, quiet."""
    return [
        "fit",
        f"--data.corpus={corpus_dir / 'input.txt'}",
        "--data.batch_size=4",
        *TINY_MODEL_ARGS,
        f"--trainer.max_steps={max_steps}",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def fit_tiny_run(root: Path, max_steps: int = 4) -> Path:
    """A tiny run fitted in ``root`` (its corpus in root/data/input.txt), for a module-scoped fixture: its folder."""
    from shakespeare_gpt.cli import cli_main

    (root / "data").mkdir()
    (root / "data" / "input.txt").write_text(TINY_TEXT, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "argv", sys.argv[:1])  # before the autouse fixture that does it for each test
        cli_main(tiny_fit_args(root / "data", max_steps))
    return root / "lightning_logs" / "version_0"


@pytest.fixture(autouse=True)
def cli_argv_is_the_tests_own(monkeypatch):
    """Tests hand the CLI its arguments (``args=[...]``); pytest's own command line is not for it."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A data_dir holding a tiny ``input.txt`` (used with ``sha256=None``)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "input.txt").write_text(TINY_TEXT, encoding="utf-8")
    return d


@pytest.fixture
def serve() -> Iterator:
    """``serve(payload, fail_first=0) -> url`` of a loopback HTTP server answering GETs with ``payload``.

    The first ``fail_first`` requests get ``status`` (503: a server having a bad moment) instead.
    """
    servers = []

    def start(payload: bytes, fail_first: int = 0, status: int = 503) -> str:
        failures = [fail_first]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if failures[0] > 0:
                    failures[0] -= 1
                    self.send_error(status)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/input.txt"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens: stands in for "no network"."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"
