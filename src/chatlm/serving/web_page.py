"""The chat page at ``/``: static files built from ``web/`` (see web/package.json) and shipped in the package, so
serving it needs no node. The page talks to the same /v1/chat/completions as any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

WEB = Path(__file__).with_name("web")
FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}
# The page loads nothing from elsewhere: a model's reply cannot pull images or scripts from the web.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html", headers=HEADERS)

    @app.get("/web/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in FILES:
            raise HTTPException(404, "no such file")
        return FileResponse(WEB / name, media_type=FILES[name], headers=HEADERS)
