"""A small client of Prometheus' HTTP API (/api/v1/query, query_range,
rules), for the renderer and the tests. Standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request


class PromQLError(Exception):
    """Prometheus answered with an error (bad query, failed evaluation)."""


class PrometheusAPI:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, path: str, params: dict | None = None) -> object:
        # POST: dashboard queries can be longer than a URL should be
        body = urllib.parse.urlencode(params).encode() if params is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=body)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422/503 carry a JSON error
            try:
                answer = json.load(exc)
            except ValueError:
                raise PromQLError(f"{path}: HTTP {exc.code}") from None
        if answer.get("status") != "success":
            raise PromQLError(f"{answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict]:
        """An instant query: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        params = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        data = self._call("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """A range query: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        data = self._call("/api/v1/query_range", {
            "query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
        return data["result"]

    def rules(self) -> list[dict]:
        """Every loaded rule with its health and last error."""
        return [rule for group in self._call("/api/v1/rules")["groups"] for rule in group["rules"]]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False
