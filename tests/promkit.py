"""Prometheus as a real process for the tests: Debian's `prometheus` 2.42, exemplar storage on, a free
loopback port, storage in the test's tmp dir."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
{rule_files}scrape_configs:
  - job_name: stablews
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def binary(name: str, package: str = "prometheus") -> str:
    """The path of a Debian-packaged tool, or a one-line failure saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: apt-get install {package}", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_config(target_port: int, rule_files: list[Path] | None = None) -> str:
    """Scrape the service (job `stablews`) every second; evaluate `rule_files` every second."""
    rules = ""
    if rule_files:
        rules = "rule_files:\n" + "".join(f"  - {path}\n" for path in rule_files)
    return SCRAPE_CONFIG.format(port=target_port, rule_files=rules)


class Prometheus:
    """`prometheus` (with exemplar storage) as its own process, with the given configuration."""

    def __init__(self, directory: Path, config_text: str) -> None:
        executable = binary("prometheus")
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(config_text)
        self.log = directory / "prometheus.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                executable, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage",
                "--log.level=warn",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text()[-4000:]

    async def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(self.url + "/-/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    async def get(self, path: str, **params: Any) -> Any:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(self.url + path, params=params)
        response.raise_for_status()
        return response.json()

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant-query result vector; an expression Prometheus refuses fails the test with its error."""
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(self.url + "/api/v1/query", params={"query": expr})
        body = response.json()
        assert body.get("status") == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()
