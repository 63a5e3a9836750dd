"""`cifarcnn serve`: the same answers as `cifarcnn predict`, batching, bad input, the token, stopping, the
page."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import io
import json
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from cifarcnn.cli import main
from cifarcnn.data.cifar import load_cifar10

from .helpers import child_env
from .serve_client import ServerProcess, multipart, predict_files, request

serve = pytest.importorskip("cifarcnn.use.serve", reason="the serve extra is not installed")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pngs(cifar_root, tmp_path_factory) -> list[Path]:
    """Twelve synthetic test images as PNG files."""
    root = tmp_path_factory.mktemp("serve-pngs")
    data = load_cifar10(cifar_root)
    files = []
    for n, pixels in enumerate(data.test_images[:12].permute(0, 2, 3, 1).numpy()):
        Image.fromarray(pixels).save(root / f"{n}.png")
        files.append(root / f"{n}.png")
    return files


@pytest.fixture(scope="module")
def server(trained_run_dir):
    """A server with a 1 MB body limit, shared by the tests that do not stop it."""
    process = ServerProcess(trained_run_dir, "--max-body-mb", "1")
    yield process
    assert process.stop() == 0, process.output


@pytest.fixture(scope="module")
def loaded(trained_run_dir):
    from cifarcnn.use.predict import load_model

    return load_model(trained_run_dir, "cpu")


@contextlib.contextmanager
def in_process(loaded, **options):
    """A server for `loaded` on a thread of this process (free 127.0.0.1 port): yields (app, port)."""
    server, sock, app = serve.make_server(loaded, serve.ServeOptions(port=0, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.02)
        yield app, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def printed(p: float) -> str:
    return f"{p:.2%}"  # how `predict` prints a probability


# --------------------------------------------------------------------------- same answers as predict


def test_answers_equal_predict_for_the_same_files(server, trained_run_dir, pngs, tmp_path, capsys):
    out = tmp_path / "predict.json"
    assert main(["predict", str(trained_run_dir), *map(str, pngs), "--top-k", "3", "--device", "cpu",
                 "--output", str(out)]) == 0
    table = capsys.readouterr().out
    expected = {Path(r["path"]).name: r["predictions"] for r in json.loads(out.read_text())["results"]}
    status, together = predict_files(server.port, pngs, top_k=3)  # one request, several files
    assert status == 200, together
    answers = {r["name"]: r["predictions"] for r in together["results"]}
    for png in pngs[:4]:  # and one raw body per request
        status, alone, _ = request(server.port, "POST", "/v1/predict?top_k=3", png.read_bytes())
        assert status == 200 and alone["results"][0]["name"] == "body"
        assert [p["class"] for p in alone["results"][0]["predictions"]] == \
            [p["class"] for p in answers[png.name]]
        assert [printed(p["probability"]) for p in alone["results"][0]["predictions"]] == \
            [printed(p["probability"]) for p in expected[png.name]]
    assert set(answers) == set(expected)
    for name, predictions in answers.items():
        assert [p["class"] for p in predictions] == [p["class"] for p in expected[name]]
        assert [printed(p["probability"]) for p in predictions] == \
            [printed(p["probability"]) for p in expected[name]]
        top = predictions[0]
        assert any(line.split()[:3] == [str(Path(pngs[0].parent) / name), top["class"],
                                        printed(top["probability"])]
                   for line in table.splitlines())
    identity = together["model"]
    assert identity["run"] == trained_run_dir.name and identity["checkpoint"] == "best.pt"
    assert identity["digest"].startswith("sha256:") and len(identity["digest"]) == 71
    assert identity["preset"] == "seed" and identity["preset_overrides"]["epochs"] == 2
    assert (identity["tta"], identity["precision"]) == (json.loads(out.read_text())["tta"],
                                                        json.loads(out.read_text())["precision"])


def test_model_endpoint_describes_the_checkpoint(server, trained_run_dir, loaded):
    status, model, _ = request(server.port, "GET", "/v1/model")
    assert status == 200
    checkpoint = loaded.checkpoint
    assert model["classes"] == list(checkpoint["classes"]) and model["image_size"] == 32
    assert (model["mean"] == pytest.approx(checkpoint["mean"])
            and model["std"] == pytest.approx(checkpoint["std"]))
    assert model["validation_accuracy"] == checkpoint["best_val_acc"]
    assert model["test_accuracy"] is None  # trained without --test, never evaluated
    assert model["preset"] == "seed" and model["tta"] == loaded.settings.tta
    assert request(server.port, "GET", "/healthz")[:2] == (200, {"status": "ok"})
    docs = request(server.port, "GET", "/openapi.json")[1]
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(docs["paths"])


def test_model_endpoint_shows_the_test_accuracy_train_test_measured(cifar_root, tmp_path):
    from cifarcnn.base.config import make_config
    from cifarcnn.training.train import train
    from cifarcnn.use.predict import load_model

    run = tmp_path / "run"
    cfg = make_config({}, ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100"])
    train(cfg, run, data_dir=cifar_root, device="cpu", test=True)
    measured = json.loads((run / "test.json").read_text())
    with in_process(load_model(run, "cpu")) as (_, port):
        status, model, _ = request(port, "GET", "/v1/model")
    assert status == 200 and model["test_accuracy"] == measured["test_acc"] is not None
    # measured on best.pt with the run's TTA: not shown for another checkpoint file or TTA level
    assert serve.describe_model(load_model(run / "last.pt", "cpu"))[1]["test_accuracy"] is None
    assert serve.describe_model(load_model(run, "cpu", tta=measured["tta"] + 1))[1]["test_accuracy"] is None


def test_closest_preset_names_the_overrides():
    from cifarcnn.base.config import load_preset

    config = load_preset("quick", ["epochs=1", "data.val_size=100"]).to_dict()
    # epochs set by hand switch the preset's step budget off (config.make_config)
    assert serve.closest_preset(config) == ("quick", {"epochs": 1, "min_steps": 0, "data.val_size": 100})
    assert serve.closest_preset(load_preset("fast").to_dict()) == ("fast", {})


# --------------------------------------------------------------------------- batching and threads


def test_batcher_gathers_concurrent_images_into_one_pass_off_the_event_loop():
    calls: list[tuple[int, str]] = []

    def run(images: np.ndarray) -> list[int]:
        calls.append((len(images), threading.current_thread().name))
        return [int(image[0, 0, 0]) for image in images]

    async def submit_all(batcher, count):
        return await asyncio.gather(*(batcher.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(count)))

    for max_batch, sizes in ((4, [4, 3]), (1, [1] * 7)):
        calls.clear()
        batcher = serve.Batcher(run, max_batch=max_batch, max_wait=0.5)
        batcher.start()
        try:
            assert asyncio.run(submit_all(batcher, 7)) == list(range(7))  # each request gets its own row
        finally:
            batcher.stop()
        assert [size for size, _ in calls] == sizes
        assert all(thread == "cifarcnn-batcher" for _, thread in calls)
        assert list(batcher.batch_sizes) == sizes


def submit_within(batcher, images: list[np.ndarray], seconds: float = 10) -> list:
    """What `submit` gives each image (its result or its exception); the test fails if one waits `seconds`."""
    async def all_of_them():
        jobs = (asyncio.wait_for(batcher.submit(image), seconds) for image in images)
        return await asyncio.gather(*jobs, return_exceptions=True)

    answers = asyncio.run(all_of_them())
    waited = any(isinstance(a, asyncio.TimeoutError) for a in answers)
    assert not waited, f"a request waited {seconds}s: {answers}"
    return answers


def test_a_batch_with_missing_rows_fails_each_request_and_the_worker_goes_on():
    short = [True]

    def run(images: np.ndarray) -> list[int]:
        rows = [int(image[0, 0, 0]) for image in images]
        return rows[:-1] if short.pop() else rows

    batcher = serve.Batcher(run, max_batch=4, max_wait=0.5)
    batcher.start()
    try:
        answers = submit_within(batcher, [np.full((2, 2, 3), i, np.uint8) for i in range(3)])
        assert all(isinstance(a, RuntimeError) for a in answers)
        assert all("2 results for a batch of 3 images" in str(a) for a in answers)
        short.append(False)
        assert submit_within(batcher, [np.full((2, 2, 3), 7, np.uint8)]) == [7]
    finally:
        batcher.stop()


def test_a_closed_event_loop_does_not_stop_the_worker():
    def slow(images: np.ndarray) -> list[int]:
        time.sleep(0.5)
        return [int(image[0, 0, 0]) for image in images]

    async def give_up() -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(np.zeros((2, 2, 3), np.uint8)), 0.1)

    batcher = serve.Batcher(slow, max_batch=4, max_wait=0)
    batcher.start()
    try:
        asyncio.run(give_up())  # its event loop is closed before the forward pass ends
        time.sleep(1)  # the pass ends; its answer finds the loop closed
        assert submit_within(batcher, [np.full((2, 2, 3), 5, np.uint8)]) == [5]
    finally:
        batcher.stop()


class WorkerBug(BaseException):
    """An error the worker cannot hand to a batch (not an Exception)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker logs its bug
def test_when_the_worker_dies_its_batch_and_every_later_request_get_an_error():
    def broken(images: np.ndarray) -> list[int]:
        raise WorkerBug("boom")

    batcher = serve.Batcher(broken, max_batch=4, max_wait=0)
    batcher.start()
    answers = submit_within(batcher, [np.zeros((2, 2, 3), np.uint8)])
    assert isinstance(answers[0], RuntimeError) and "WorkerBug: boom" in str(answers[0])
    batcher._thread.join(10)
    later = submit_within(batcher, [np.zeros((2, 2, 3), np.uint8)], seconds=2)
    assert isinstance(later[0], RuntimeError) and "worker has stopped" in str(later[0])
    batcher.stop()
    stopped = serve.Batcher(lambda images: list(range(len(images))), max_batch=4, max_wait=0)
    stopped.start()
    stopped.stop()
    late = submit_within(stopped, [np.zeros((2, 2, 3), np.uint8)], seconds=2)
    assert isinstance(late[0], RuntimeError) and "the server is stopping" in str(late[0])


def test_concurrent_requests_share_forward_passes(loaded, pngs):
    with in_process(loaded, max_batch=16, max_wait_ms=400) as (app, port):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda png: request(port, "POST", "/v1/predict", png.read_bytes()),
                                    pngs[:8]))
        sizes = list(app.state.batcher.batch_sizes)
        assert all(status == 200 for status, _, _ in answers)
        assert sum(sizes) == 8 and len(sizes) <= 2, sizes  # 8 requests, one or two forward passes
        _, alone = predict_files(port, pngs[:1])
    assert [p["class"] for p in answers[0][1]["results"][0]["predictions"]] == \
        [p["class"] for p in alone["results"][0]["predictions"]]


def test_decoding_runs_on_a_thread_pool_and_does_not_block_other_requests(loaded, pngs, monkeypatch):
    real = serve.read_image

    def slow_read(*args):
        time.sleep(0.6)
        return real(*args)

    monkeypatch.setattr(serve, "read_image", slow_read)
    with in_process(loaded, max_batch=1, max_wait_ms=0) as (_, port):
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(request, port, "POST", "/v1/predict", png.read_bytes()) for png in pngs[:3]]
            time.sleep(0.2)
            assert request(port, "GET", "/healthz")[0] == 200
            health_seconds = time.monotonic() - started
            assert all(f.result()[0] == 200 for f in slow)
        total = time.monotonic() - started
    assert health_seconds < 0.55, "a decode blocked the event loop"
    assert total < 1.5, f"3 decodes of 0.6 s took {total:.2f} s: they did not overlap"


def test_an_unexpected_error_is_a_500_without_a_traceback_and_the_server_goes_on(loaded, pngs, monkeypatch):
    real = loaded.classify
    monkeypatch.setattr(loaded, "classify",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("/secret/path boom")))
    with in_process(loaded) as (_, port):
        status, answer, _ = request(port, "POST", "/v1/predict", pngs[0].read_bytes())
        assert status == 500 and answer == {"detail": "internal error (RuntimeError)"}
        monkeypatch.setattr(loaded, "classify", real)
        assert request(port, "POST", "/v1/predict", pngs[0].read_bytes())[0] == 200


# --------------------------------------------------------------------------- bad input


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def raw_exchange(port: int, head: bytes, body_chunks=(), timeout: float = 30) -> bytes:
    """Send a request by hand (headers, then chunks); what the server answers (b"" if none in `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server may answer and close before the body is all sent
            for chunk in body_chunks:
                sock.sendall(chunk)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, pngs):
    port, good = server.port, pngs[0].read_bytes()
    cases = {
        "bomb": (b"", png_bytes((8000, 6000), "1"), 422, "too large to decode safely"),
        "not an image": (b"", b"hello, world", 422, "not an image"),
        "truncated": (b"", good[: len(good) // 2], 422, "truncated"),
        "empty": (b"", b"", 400, "empty request body"),
        "a server path as the body": (b"", str(pngs[0]).encode(), 422, "not an image"),
        "top_k a superscript digit": ("?top_k=²".encode(), good, 400, "bad top_k '²': Input should be a"),
        "top_k over the classes": (b"?top_k=11", good, 400, "bad top_k 11: at most 10, the number of"),
        "top_k 0": (b"?top_k=0", good, 400, "bad top_k '0': Input should be greater than or equal to 1"),
        "top_k not a number": (b"?top_k=three", good, 400, "bad top_k 'three': Input should be a valid"),
    }
    for name, (query, body, status, words) in cases.items():
        got, answer, _ = request(port, "POST", "/v1/predict" + quote(query.decode(), safe="/?="), body)
        assert got == status and words in answer["detail"], (name, got, answer)
        assert "Traceback" not in json.dumps(answer)
    body, headers = multipart([("a.png", good)], {"top_k": "²"})
    got, answer, _ = request(port, "POST", "/v1/predict", body, headers)
    assert got == 400 and answer["detail"].startswith("bad top_k '²': Input should be a valid int"), answer
    body, headers = multipart([], {"image": "x"})
    got, answer, _ = request(port, "POST", "/v1/predict", body, headers)
    assert got == 400 and "missing field 'file'" in answer["detail"]
    # a multipart file named after a real image on the server: its content counts, never the path
    body, headers = multipart([(str(pngs[1]), b"not image bytes")])
    got, answer, _ = request(port, "POST", "/v1/predict", body, headers)
    assert got == 422 and "not an image" in answer["detail"]
    status, answer = predict_files(port, pngs[:2])
    assert status == 200 and len(answer["results"]) == 2
    assert server.proc.poll() is None


CHUNK = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
HEAD = "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\n{}\r\n\r\n"


def unfinished_chunked_upload(port: int, most: int = 16 * 2**20) -> tuple[bytes, int]:
    """Send a chunked body 64 KiB at a time, never its last chunk, until the server answers (or `most` bytes
    are sent): (the answer, b"" if none within 20 s; bytes sent). A server that reads a whole body before
    checking its size never answers this request."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(HEAD.format("/v1/predict", "Transfer-Encoding: chunked").encode())
        sent = 0
        with contextlib.suppress(OSError):  # the server answers and closes while we send
            while sent < most and not select.select([sock], [], [], 0)[0]:
                sock.sendall(CHUNK)
                sent += 65536
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer, sent


def test_an_oversized_body_is_refused_without_reading_it_all(server):
    port = server.port
    # declared over the 1 MB limit: answered before any body is sent
    answer = raw_exchange(port, HEAD.format("/v1/predict", "Content-Length: 2000000").encode())
    assert answer.startswith(b"HTTP/1.1 413") and b"1 MB limit" in answer
    # streamed without a length: answered once over the limit, while the client is still sending
    answer, sent = unfinished_chunked_upload(port)
    assert answer.startswith(b"HTTP/1.1 413") and b"1 MB limit" in answer, (answer, sent)
    assert sent < 16 * 2**20
    assert request(port, "GET", "/healthz")[0] == 200


def test_an_unknown_path_is_a_404_before_its_body_is_read(server):
    assert request(server.port, "GET", "/../../../etc/passwd")[0] == 404
    # a body under the limit declared but never sent: a server that read it first would wait for it
    head = HEAD.format("/v1/upload", "Content-Length: 900000").encode()
    answer = raw_exchange(server.port, head, timeout=10)
    assert answer.startswith(b"HTTP/1.1 404"), answer


def test_request_bodies_beyond_the_limit_get_503_and_the_others_go_on(loaded, pngs):
    image = pngs[0].read_bytes()
    with in_process(loaded, max_uploads=2) as (_, port), contextlib.ExitStack() as stack:
        slow = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
                for _ in range(2)]
        start = HEAD.format("/v1/predict", "Transfer-Encoding: chunked").encode() + b"a\r\n" + image[:10]
        for sock in slow:  # two uploads that have sent 10 bytes of their body and wait
            sock.sendall(start + b"\r\n")
        deadline = time.monotonic() + 20
        post = functools.partial(request, port, "POST", "/v1/predict", image)
        while (answer := post())[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)  # until the server has read the start of both
        status, detail, headers = answer
        assert status == 503 and headers.get("retry-after") == "1" and "too many uploads" in detail["detail"]
        assert request(port, "GET", "/healthz")[0] == 200  # no body: no slot needed
        slow[0].sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(image) - 10, image[10:]))
        assert slow[0].recv(65536).startswith(b"HTTP/1.1 200")
        while (status := post()[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.1)  # the finished upload's slot is free again
        assert status == 200


def test_without_a_token_only_requests_to_loopback_names_are_answered(server, pngs):
    port, image = server.port, pngs[0].read_bytes()
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "127.0.0.2"):
        assert request(port, "GET", "/v1/model", headers={"Host": host})[0] == 200, host
    for host in (f"attacker.example:{port}", "127.0.0.1.nip.io", "localhost.attacker.example", "[::2]"):
        status, answer, _ = request(port, "GET", "/v1/model", headers={"Host": host})
        assert status == 403 and f"Host header {host!r} is not this server's" in answer["detail"], host
    status, answer, _ = request(port, "POST", "/v1/predict", image, {"Origin": "https://evil.example"})
    assert status == 403 and "Origin header 'https://evil.example' is not this server's" in answer["detail"]
    assert request(port, "POST", "/v1/predict", image, {"Origin": f"http://localhost:{port}"})[0] == 200


# --------------------------------------------------------------------------- token, address, stopping


@pytest.mark.parametrize("host", ["0.0.0.0", "example.invalid"])
def test_refuses_a_non_loopback_address_without_a_token(trained_run_dir, host):
    env = {k: v for k, v in child_env().items() if k != "CIFARCNN_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "cifarcnn", "serve", str(trained_run_dir), "--host", host,
                           "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"refusing to listen on {host} without a token" in done.stderr and "Traceback" not in done.stderr


def test_a_token_is_required_on_the_api(trained_run_dir, pngs):
    process = ServerProcess(trained_run_dir, env={"CIFARCNN_TOKEN": "s3cret"})
    try:
        port, image = process.port, pngs[0].read_bytes()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            status, answer, got = request(port, "POST", "/v1/predict", image, headers)
            assert status == 401 and "token" in answer["detail"] and got.get("www-authenticate") == "Bearer"
            assert request(port, "GET", "/v1/model", headers=headers)[0] == 401
        good = {"Authorization": "Bearer s3cret"}
        assert request(port, "POST", "/v1/predict", image, good)[0] == 200
        for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 6750 and 9110)
            given = {"Authorization": f"{scheme} s3cret"}
            assert request(port, "POST", "/v1/predict", image, given)[0] == 200
        # with a token, any Host name: the server may sit behind a proxy or on a LAN address
        assert request(port, "GET", "/v1/model", headers={**good, "Host": "cifar.example"})[0] == 200
        assert request(port, "GET", "/v1/model", headers=good)[0] == 200
        assert request(port, "GET", "/healthz")[0] == 200 and request(port, "GET", "/")[0] == 200
    finally:
        assert process.stop() == 0, process.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_requests_in_flight_then_exits_0(trained_run_dir, pngs, sig):
    process = ServerProcess(trained_run_dir, "--max-wait-ms", "2500")  # each request waits 2.5 s for company
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(request, process.port, "POST", "/v1/predict", pngs[0].read_bytes())
        time.sleep(1.0)
        process.proc.send_signal(sig)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", process.port), timeout=5).close()
        status, answer, _ = in_flight.result(60)
    assert status == 200 and answer["results"][0]["predictions"]
    assert process.stop(None) == 0, process.output
    assert "Traceback" not in process.output and "stopped" in process.output


def test_without_fastapi_serve_names_the_extra(trained_run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "cifarcnn.use.serve")
    assert main(["serve", str(trained_run_dir)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'cifarcnn[serve]'" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the page


def test_page_is_self_contained(server):
    status, page, _ = request(server.port, "GET", "/")
    assert status == 200 and "<input" in page and 'type="file"' in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page  # nothing from elsewhere


def chromium_and_driver() -> tuple[str, str]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if browser is None:
        if __import__("os").environ.get("CI"):
            pytest.fail("CI is set but Chromium is not installed (.ci/run installs chromium and "
                        "chromium-driver)")
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")
    driver = shutil.which("chromedriver")
    assert driver, "Chromium is installed but chromedriver is not: apt-get install chromium-driver"
    return browser, driver


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """One headless Chromium with a 1200x900 window for the page tests."""
    browser, driver_path = chromium_and_driver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def upload(driver, path: Path):
    """Choose `path` in the page's file chooser; its card once the card shows a result or an error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CLASS_NAME, "result"))
    chooser = driver.find_element(By.ID, "files")
    driver.execute_script("arguments[0].hidden = false", chooser)
    chooser.send_keys(str(path))
    driver.execute_script("arguments[0].hidden = true", chooser)
    return WebDriverWait(driver, 60).until(
        lambda d: len(cards := d.find_elements(By.CLASS_NAME, "result")) > before and
        (cards[0].get_attribute("data-top") or cards[0].get_attribute("data-error")) and cards[0])


RECORD_OBJECT_URLS = """
window.created = []; window.revoked = [];
const create = URL.createObjectURL, revoke = URL.revokeObjectURL;
URL.createObjectURL = (o) => { const url = create(o); window.created.push(url); return url; };
URL.revokeObjectURL = (url) => { window.revoked.push(url); revoke(url); };
"""
ERROR_RED = "rgba(176, 0, 32, 1)"  # the page's colour for errors (#b00020)
BOXES = "return ['model', 'drop', 'results'].map(id => $(id).getBoundingClientRect().toJSON())"


def test_page_in_chromium_shows_results_errors_and_a_stopped_server(chromium, loaded, pngs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (tmp_path / "notes.txt").write_text("a file that is not an image")
    with in_process(loaded) as (_, port):
        chromium.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(chromium, 60).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        model_line = chromium.find_element(By.ID, "model").text
        chromium.execute_script(RECORD_OBJECT_URLS)
        card = upload(chromium, pngs[3])
        assert card.get_attribute("data-error") is None, card.get_attribute("data-error")
        shown = [(r.find_element(By.CLASS_NAME, "name").text, r.find_element(By.CLASS_NAME, "pct").text)
                 for r in card.find_elements(By.CLASS_NAME, "row")]
        bad = upload(chromium, tmp_path / "notes.txt")
        assert "notes.txt: not an image" in bad.get_attribute("data-error")
        _, answer = predict_files(port, [pngs[3]])
    stopped = upload(chromium, pngs[4])  # the server has stopped
    assert "could not reach the server" in stopped.get_attribute("data-error")
    # the file that is not an image: a placeholder in an error card, not a broken image with its alt text
    WebDriverWait(chromium, 10).until(lambda d: bad.find_elements(By.CLASS_NAME, "thumb"))
    assert not bad.find_elements(By.TAG_NAME, "img") and "failed" in bad.get_attribute("class").split()
    assert bad.find_element(By.CLASS_NAME, "error").value_of_css_property("color") == ERROR_RED
    assert card.find_element(By.TAG_NAME, "img").get_property("naturalWidth") == 32
    model, drop, results = chromium.execute_script(BOXES)  # nothing overlaps at 1200x900
    assert model["bottom"] <= drop["top"] and drop["bottom"] <= results["top"], (model, drop, results)
    WebDriverWait(chromium, 10).until(  # every thumbnail's object URL released once shown
        lambda d: d.execute_script("return created.length === 3 && created.every(u => revoked.includes(u))"))
    chromium.save_screenshot(str(tmp_path / "page.png"))
    expected = [(p["class"], printed(p["probability"])) for p in answer["results"][0]["predictions"]]
    assert shown == expected and len(shown) == 3
    assert "classes" in model_line and "tta" in model_line


class FailingServer(http.server.BaseHTTPRequestHandler):
    """Serves the page at / and fails every API request as `how` says: "json" (a 500 with the server's JSON
    detail), "html" (a proxy's 502 page) or "closed" (the connection closed without an answer)."""

    how = "json"

    def do_GET(self) -> None:
        if self.path != "/":
            return self.fail()
        page = (resources.files("cifarcnn.use") / "serve_page.html").read_bytes()
        self.answer(200, "text/html", page)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.fail()

    def fail(self) -> None:
        if self.how == "json":
            self.answer(500, "application/json", b'{"detail": "internal error (RuntimeError)"}')
        elif self.how == "html":
            self.answer(502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>")

    def answer(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("how, shown", [("json", "internal error (RuntimeError)"),
                                        ("html", "502 Bad Gateway"),
                                        ("closed", "could not reach the server")])
def test_page_in_chromium_shows_a_failing_server(chromium, pngs, how, shown):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    handler = type("Handler", (FailingServer,), {"how": how})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as stub:
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        try:
            chromium.get(f"http://127.0.0.1:{stub.server_address[1]}/")
            line = WebDriverWait(chromium, 30).until(
                lambda d: d.find_element(By.ID, "model").text.startswith("could not load the model") and
                d.find_element(By.ID, "model"))
            assert shown in line.text and line.value_of_css_property("color") == ERROR_RED, line.text
            card = upload(chromium, pngs[0])
            error = card.get_attribute("data-error")
            assert shown in error and "JSON" not in error, error
        finally:
            stub.shutdown()


# --------------------------------------------------------------------------- the load benchmark


def test_load_benchmark_runs_end_to_end(trained_run_dir, cifar_root, tmp_path):
    pngs_dir = tmp_path / "pngs"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "test_set_as_pngs.py"), str(pngs_dir),
                    "--data-dir", str(cifar_root)], check=True, capture_output=True, timeout=120)
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(trained_run_dir),
                           str(pngs_dir), "--requests", "60", "--clients", "4", "--device", "cpu", "--out",
                           str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(out.read_text())
    for key in ("batched", "max_batch_1"):
        run = summary[key]
        assert run["requests"] == 60 and run["errors"] == 0 and run["requests_per_second"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"] and run["rss_start_mb"] > 0 and run["rss_end_mb"] > 0
    assert summary["predict"]["images"] == 60 and summary["predict"]["images_per_second"] > 0
    assert set(summary["targets"]) == {"zero errors", "throughput >= 0.3x predict", "p99 <= 250 ms",
                                       "memory growth < 50 MB", "batching >= 1.5x max-batch 1"}
    assert "req/s" in done.stdout
