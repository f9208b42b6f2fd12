"""The sandbox server: shared state, the two listeners, and signed result downloads.

A `Sandbox` listens twice on the same host:
- the API host (`base_url`), where clients submit, as they would to `api.bfl.ai`;
- the cluster host (`cluster_url`), which plays the other cluster and the CDN a vendor hands out URLs
  on (BFL's `polling_url` on `api.eu2.bfl.ai`, its results on `delivery-eu1.bfl.ai`), so that a client
  which rebuilds URLs instead of using them as returned fails here as it would in production.

Result downloads (`GET /delivery/{vendor}/{name}?se=EXPIRY&sig=SIGNATURE` on the cluster host) need no
API key; they are signed like an Azure blob SAS URL, and an expired or tampered signature answers 403
with Azure's XML error envelope (`AuthenticationFailed`); a valid signature for a result that does not
exist answers 404 (`BlobNotFound`). The image is drawn when downloaded, so nothing large is kept.

Each vendor's wire protocol lives in its own module (`bfl.py`), which installs its routes here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Literal
from xml.sax.saxutils import escape

from aiohttp import web

from sandbox.ark import ArkApi
from sandbox.bfl import BflApi
from sandbox.gemini import GeminiApi
from sandbox.openai import OpenAIApi

__all__ = ["SANDBOX", "DeliveryRenderer", "KeyCheck", "Sandbox"]

# Large enough for a request carrying eight base64 reference images.
_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# A sandbox answers in milliseconds; a client still connected at shutdown is not worth waiting for.
_SHUTDOWN_TIMEOUT_S = 2.0


#: what the API key a request presented amounts to
KeyCheck = Literal["missing", "wrong", "accepted"]

#: draws the file a delivery path names (the part after the vendor): (bytes, content type), or None
DeliveryRenderer = Callable[[str], tuple[bytes, str] | None]


class Sandbox:
    """Local, wire-faithful stand-ins for the vendor APIs, with fault injection driven by the prompt."""

    def __init__(
        self,
        *,
        base_url: str,
        cluster_url: str,
        latency_s: float = 0.0,
        api_key: str | None = None,
        result_ttl_s: float = 600.0,
        bfl_max_active: int = 24,
    ) -> None:
        #: where clients submit, e.g. "http://127.0.0.1:41234"
        self.base_url = base_url
        #: the "other cluster" host that polling and result URLs point at
        self.cluster_url = cluster_url
        #: how long every task takes before its result is ready
        self.latency_s = latency_s
        #: the one key accepted, or None to accept any non-empty key
        self.api_key = api_key
        #: how long a signed result URL stays valid after the result is ready (BFL: 10 minutes)
        self.result_ttl_s = result_ttl_s
        #: calls per vendor and kind: "bfl.submit" (accepted), "bfl.submit_refused", "bfl.poll",
        #: "bfl.poll_wrong_host" (polls of the API host instead of `polling_url`), "bfl.download"
        self.counters: Counter[str] = Counter()
        self._secret = secrets.token_bytes(32)
        self._spent_faults: set[tuple[str, str, str]] = set()
        self._renderers: dict[str, DeliveryRenderer] = {}
        #: BFL FLUX.2: its tasks are in `bfl.tasks`
        self.bfl = BflApi(self, max_active=bfl_max_active)
        #: OpenAI images (gpt-image-1.5)
        self.openai = OpenAIApi(self)
        #: BytePlus ModelArk images (Seedream 4.0 / 4.5)
        self.ark = ArkApi(self)
        #: Gemini generateContent (Nano Banana / Pro)
        self.gemini = GeminiApi(self)

    @classmethod
    @asynccontextmanager
    async def running(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cluster_port: int = 0,
        latency_s: float = 0.0,
        api_key: str | None = None,
        result_ttl_s: float = 600.0,
        bfl_max_active: int = 24,
    ) -> AsyncIterator[Sandbox]:
        """Serve a new sandbox on `host:port` (0: an ephemeral port) until the block exits."""
        async with AsyncExitStack() as stack:
            # Binding before building the Sandbox lets it know its own URLs from the start.
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            api_socket = stack.enter_context(socket.create_server((host, port), family=family))
            cluster_socket = stack.enter_context(socket.create_server((host, cluster_port), family=family))
            sandbox = cls(
                base_url=_url_of(host, api_socket),
                cluster_url=_url_of(host, cluster_socket),
                latency_s=latency_s,
                api_key=api_key,
                result_ttl_s=result_ttl_s,
                bfl_max_active=bfl_max_active,
            )
            for app, listener in ((sandbox._api_app(), api_socket), (sandbox._cluster_app(), cluster_socket)):
                runner = web.AppRunner(app, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                await web.SockSite(runner, listener).start()
            yield sandbox

    def check_key(self, presented: str | None) -> KeyCheck:
        """Judge the API key a request presented."""
        if not presented:
            return "missing"
        if self.api_key is None or hmac.compare_digest(presented.encode(), self.api_key.encode()):
            return "accepted"
        return "wrong"

    def first_time(self, vendor: str, fault: str, prompt: str) -> bool:
        """True the first time `fault` fires for this exact prompt at this vendor, False afterwards."""
        key = (vendor, fault, prompt)
        if key in self._spent_faults:
            return False
        self._spent_faults.add(key)
        return True

    def register_delivery(self, vendor: str, renderer: DeliveryRenderer) -> None:
        """Serve `/delivery/{vendor}/...` downloads with `renderer`."""
        self._renderers[vendor] = renderer

    def renderer_for(self, vendor: str) -> DeliveryRenderer | None:
        """The renderer serving `vendor`'s downloads, if it registered one."""
        return self._renderers.get(vendor)

    def signed_url(self, vendor: str, name: str, *, expires_at: float) -> str:
        """A download URL on the cluster host for `name`, valid until the wall-clock time `expires_at`."""
        path = f"/delivery/{vendor}/{name}"
        expiry = int(expires_at)
        return f"{self.cluster_url}{path}?se={expiry}&sig={self._signature(path, expiry)}"

    def _signature(self, path: str, expiry: int) -> str:
        return hmac.new(self._secret, f"{path}\n{expiry}".encode(), hashlib.sha256).hexdigest()

    def signature_problem(self, path: str, query: Mapping[str, str]) -> str | None:
        """Why a delivery URL's signature is refused (tampered, malformed, expired), or None if valid."""
        try:
            expiry = int(query["se"])
            signature = query["sig"]
        except (KeyError, ValueError):
            return "Signature fields not well formed."
        if not hmac.compare_digest(signature, self._signature(path, expiry)):
            return "Signature did not match."
        now = int(time.time())
        if now >= expiry:
            return (
                "Signature not valid in the specified time frame: "
                f"Expiry [{_http_time(expiry)}] - Current [{_http_time(now)}]"
            )
        return None

    def _api_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
        app[SANDBOX] = self
        app.add_routes(self.bfl.api_routes())
        app.add_routes(self.openai.api_routes())
        app.add_routes(self.ark.api_routes())
        app.add_routes(self.gemini.api_routes())
        app.add_routes([web.get("/_sandbox/counters", _counters)])
        return app

    def _cluster_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
        app[SANDBOX] = self
        app.add_routes(self.bfl.cluster_routes())
        app.add_routes([web.get("/delivery/{vendor}/{name:.+}", _deliver)])
        return app


#: the Sandbox serving an application
SANDBOX = web.AppKey("sandbox", Sandbox)


async def _counters(request: web.Request) -> web.Response:
    """The sandbox's own call counters (not a vendor route): lets a test that runs the sandbox as a
    separate process count what several replicas submitted, e.g. `{"bfl.submit": 300}`."""
    return web.json_response(dict(request.app[SANDBOX].counters))


async def _deliver(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    vendor = request.match_info["vendor"]
    sandbox.counters[f"{vendor}.download"] += 1
    problem = sandbox.signature_problem(request.path, request.query)
    if problem is not None:
        return _blob_error(
            403,
            "AuthenticationFailed",
            "Server failed to authenticate the request. Make sure the value of Authorization header "
            f"is formed correctly including the signature. {problem}",
        )
    renderer = sandbox.renderer_for(vendor)
    # Drawing a 4 MP image takes tens of milliseconds: keep the event loop free for other clients.
    delivery = await asyncio.to_thread(renderer, request.match_info["name"]) if renderer else None
    if delivery is None:
        return _blob_error(404, "BlobNotFound", "The specified blob does not exist.")
    data, content_type = delivery
    return web.Response(body=data, content_type=content_type)


def _blob_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
    )
    return web.Response(
        status=status, text=body, content_type="application/xml", headers={"x-ms-error-code": code}
    )


def _http_time(epoch: int) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(epoch))


def _url_of(host: str, listener: socket.socket) -> str:
    port = listener.getsockname()[1]
    # A wildcard address is where the sandbox listens, not an address a client can reach it at.
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
