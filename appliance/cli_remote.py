"""`appliance ingest --url`: send files to a running server's HTTP API instead of writing the data
directory (which a running server owns). The results read like a local ingest's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import msgspec

from appliance.errors import ApplianceError


class RemoteError(ApplianceError):
    """The server refused the request or could not be reached."""


class FileResult(msgspec.Struct):
    source: str
    status: str
    chunks: int = 0
    error: str | None = None


class _Answer(msgspec.Struct):
    results: list[FileResult]


def _error(resp: httpx.Response) -> RemoteError:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200] or resp.reason_phrase
    return RemoteError(f"{resp.request.url}: HTTP {resp.status_code}: {message}")


def ingest_remote(
    url: str,
    api_key: str | None,
    collection: str,
    files: list[Path],
    *,
    create: bool,
    batch: int,
    progress: Callable[[int], None],
    timeout_s: float = 600.0,
) -> list[FileResult]:
    """Upload `files` in batches of `batch` to POST {url}/v1/collections/{collection}/documents."""
    name = quote(collection, safe="")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = url.rstrip("/")
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=timeout_s, trust_env=False) as client:
            if create:
                resp = client.post("/v1/collections", json={"name": collection})
                if resp.status_code not in (201, 409):  # 409: it exists already
                    raise _error(resp)
            results: list[FileResult] = []
            for i in range(0, len(files), batch):
                group = files[i : i + batch]
                upload = [("files", (f.name, f.read_bytes())) for f in group]
                resp = client.post(f"/v1/collections/{name}/documents", files=upload)
                if resp.status_code != 200:
                    raise _error(resp)
                results += msgspec.json.decode(resp.content, type=_Answer).results
                progress(len(group))
            return results
    except httpx.HTTPError as exc:
        raise RemoteError(f"cannot reach the server at {base}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RemoteError(f"{base} did not answer like an appliance server: {exc}") from None
