"""``qscorer serve`` as a user runs it: flags, a subprocess server, SIGTERM with a batch in flight, missing extra."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_helpers import get, post_files, service_checkpoint, serving_or_skip, write_images

from qscorer.cli import main
from qscorer.scoring import Scorer

serving_or_skip()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return service_checkpoint(tmp_path_factory.mktemp("tiny_cli"), seed=5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-queue", "0"], "max-queue must be at least 1"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--max-images-per-request", "300"], "cannot exceed max-queue (256)"),
        (["--port", "70000"], "port must be between 0 and 65535"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_folder, capsys, flags, message):
    assert main(["serve", "--model-path", str(tiny_folder), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("qscorer serve: error: ") and message in error and "\n" not in error


def test_a_busy_port_is_a_one_line_error(tiny_folder, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model-path", str(tiny_folder), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_without_the_serve_extra_the_error_says_how_to_install_it(tiny_folder):
    code = "import sys; sys.modules['fastapi'] = None; from qscorer.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "serve", "--model-path", str(tiny_folder)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "pip install 'qscorer[serve]'" in result.stderr and "fastapi" in result.stderr


@pytest.mark.slow
def test_sigterm_finishes_the_batch_in_flight_then_exits_0(tiny_folder, tmp_path):
    images = write_images(tmp_path, 3, seed=4)
    files = [(path.name, path.read_bytes()) for path in images]
    expected = Scorer(tiny_folder, device="cpu", dtype="float32").score(images)
    command = [sys.executable, "-m", "qscorer", "serve", "--model-path", str(tiny_folder), "--device", "cpu",
               "--port", "0", "--max-wait-ms", "1500"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = []
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            log.append(line)
            found = re.search(r"serving on (http://\S+)", line)
            url = found.group(1) if found else None
            assert line or server.poll() is None, "".join(log)
        assert url, "".join(log)
        threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()
        while get(url + "/health")[1]["status"] != "ok":
            time.sleep(0.05)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post_files, url + "/score", files)
            while get(url + "/health")[1]["queued_images"] < 3:
                assert not answer.done() and time.monotonic() < deadline
                time.sleep(0.02)
            server.send_signal(signal.SIGTERM)
            code, body, _ = answer.result(timeout=60)
        assert server.wait(timeout=60) == 0, "".join(log)
    finally:
        if server.poll() is None:
            server.kill()
    assert code == 200
    for record, reference in zip(body["results"], expected, strict=True):
        assert record["image"] == os.path.basename(reference.image)
        assert record["score"] == pytest.approx(reference.score, abs=1e-5)
    assert "stopped by SIGTERM" in "".join(log)
