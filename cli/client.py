"""A small typed client of the REST API, shared by the CLI and the demo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse


class ApiError(RuntimeError):
    """A non-2xx answer; ``detail`` is the server's explanation (it names the field for a 422)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):  # pydantic's list of errors: "loc: msg" per entry
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body')}: {e.get('msg')}" if isinstance(e, dict)
            else str(e) for e in detail)
    return str(detail)


class Client:
    def __init__(self, url: str, key: str | None, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        response = self.http.request(method, path, **kw)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/jobs", json=spec)

    def jobs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._call("GET", "/jobs", params=params)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}/metrics")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/models")

    def model(self, model_id: str) -> dict[str, Any]:
        return self._call("GET", f"/models/{model_id}")

    def adapt(self, model_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/models/{model_id}/adapt", json=body)

    def create_key(self, tenant: str, name: str = "key") -> dict[str, Any]:
        return self._call("POST", "/keys", json={"tenant": tenant, "name": name})

    def quotas(self, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", "/quotas", params={"limit": limit, "offset": offset})

    def quota(self, tenant: str) -> dict[str, Any]:
        return self._call("GET", f"/quotas/{tenant}")

    def update_quota(self, tenant: str, values: dict[str, int | None]) -> dict[str, Any]:
        """Change the given quotas of ``tenant`` (None: back to the default); the others stay."""
        return self._call("PATCH", f"/quotas/{tenant}", json=values)

    def reset_quota(self, tenant: str) -> None:
        self._call("DELETE", f"/quotas/{tenant}")

    def submit_sweep(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/sweeps", json=spec)

    def sweeps(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._call("GET", "/sweeps", params=params)

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._call("GET", f"/sweeps/{sweep_id}")

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._call("POST", f"/sweeps/{sweep_id}/cancel")

    def events(self, job_id: str) -> Iterator[tuple[str, Any]]:
        """Server-Sent Events of a job: (event, data) pairs until the job ends."""
        return self._events(f"/jobs/{job_id}/events")

    def sweep_events(self, sweep_id: str) -> Iterator[tuple[str, Any]]:
        """Server-Sent Events of a sweep (status, trials, end): (event, data) pairs until it ends."""
        return self._events(f"/sweeps/{sweep_id}/events")

    def _events(self, path: str) -> Iterator[tuple[str, Any]]:
        with connect_sse(self.http, "GET", path, timeout=None) as source:
            if source.response.status_code >= 400:
                source.response.read()
                raise ApiError(source.response.status_code, source.response.text)
            for sse in source.iter_sse():
                if not sse.data:  # a retry or id field alone carries no event
                    continue
                yield sse.event, sse.json()
                if sse.event == "end":
                    return

    def close(self) -> None:
        self.http.close()
