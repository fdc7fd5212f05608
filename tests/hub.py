"""A Hugging Face hub endpoint on localhost, serving one repository from a local directory the way huggingface_hub
reads one (its revision, its file tree, each file with HTTP ranges), with every file request logged: the tests'
hub (the real one is not reachable here). ``HF_ENDPOINT`` pointed at ``url`` sends huggingface_hub to it."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, directory: Path):
        self.repo_id = repo_id
        self.files = {f.relative_to(directory).as_posix(): f.read_bytes() for f in sorted(Path(directory).rglob("*"))
                      if f.is_file()}
        self.log: list[tuple[str, str, str | None]] = []
        """(method, file, Range header) of every file request, in order."""
        self.stall: str | None = None
        """A file whose first whole GET sends half its bytes and then hangs (a download cut off mid-file)."""
        self._stalled, self._release = False, threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of ``name`` (None: from its first byte)."""
        return [r for method, f, r in self.log if method == "GET" and f == name]

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, headers: dict, body: bytes = b"", length: int | None = None):
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body) if length is None else length)}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self):
                self._file(head=True)

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                api = f"/api/models/{hub.repo_id}/"
                if path.startswith(api + "revision/"):
                    body = {"id": hub.repo_id, "sha": SHA, "siblings": [{"rfilename": n} for n in hub.files]}
                elif path.startswith(api + "tree/"):
                    body = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for n, d in hub.files.items()]
                else:
                    return self._file(head=False)
                self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

            def _file(self, head: bool):
                path = unquote(urlparse(self.path).path)
                name = path.removeprefix(f"/{hub.repo_id}/resolve/").partition("/")[2]
                hub.log.append(("HEAD" if head else "GET", name, self.headers.get("Range")))
                data = hub.files.get(name)
                if data is None:
                    return self._send(404, {})
                headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                if head:
                    return self._send(200, headers, length=len(data))
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if name == hub.stall and not start and not hub._stalled:
                    hub._stalled = True
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    hub._release.wait(300)
                    return
                self._send(206 if start else 200, headers, data[start:])

        return Handler


def cache_hub_dataset(cache: Path, repo_id: str, rows: list[dict]) -> Path:
    """``rows`` as a hub dataset's train split in a datasets cache (``HF_DATASETS_CACHE``), laid out as datasets
    leaves a download: ``<namespace>___<name>/default/0.0.0/<commit>/``, the Arrow file named after the dataset. Made
    by datasets' own JSON builder, then moved there (the builder names a local source's directory otherwise)."""
    import shutil

    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[-1]
    source = cache / f"{name}.jsonl"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(cache_dir=str(cache / "build"), dataset_name=name,
                   data_files=DataFilesDict.from_patterns({"train": [str(source)]}))
    builder.download_and_prepare()
    where = cache / repo_id.replace("/", "___") / "default" / "0.0.0" / SHA
    where.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, where)
    shutil.rmtree(cache / "build")
    source.unlink()
    return where
