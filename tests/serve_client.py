"""A `cifarcnn serve` child process on a free 127.0.0.1 port, and a small HTTP client for the serve tests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from .helpers import child_env


class ServerProcess:
    """`python -m cifarcnn serve TARGET ARGS --port 0`; `.port` once it prints its address."""

    def __init__(self, target: Path, *args: str, env: dict | None = None, timeout: float = 180):
        command = [sys.executable, "-m", "cifarcnn", "serve", str(target), "--port", "0", "--device", "cpu",
                   *args]
        self.proc = subprocess.Popen(command, env={**child_env(), **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while self.port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the server did not start:\n{self.output}")
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.port is None and line.startswith("serving ") and " on http://127.0.0.1:" in line:
                self.port = int(line.split(" on http://127.0.0.1:")[1].split("/")[0])

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` (None: none, it was sent already); the exit code once the process has ended."""
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not stop within {timeout}s:\n{self.output}") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            timeout: float = 120) -> tuple[int, dict | str, dict]:
    """(status, JSON body or text, headers) of one request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read().decode()
        kind = response.getheader("content-type", "")
        return response.status, json.loads(raw) if kind.startswith("application/json") else raw, \
            dict(response.getheaders())
    finally:
        connection.close()


def multipart(files: list[tuple[str, bytes]], fields: dict | None = None) -> tuple[bytes, dict]:
    """A multipart/form-data body with each file as field `file`, and its headers."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f'{value}\r\n'.encode())
    for filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def predict_files(port: int, files: list[Path], top_k: int = 3,
                  headers: dict | None = None) -> tuple[int, dict]:
    body, form_headers = multipart([(f.name, f.read_bytes()) for f in files])
    status, answer, _ = request(port, "POST", f"/v1/predict?top_k={top_k}", body,
                                {**form_headers, **(headers or {})})
    return status, answer
