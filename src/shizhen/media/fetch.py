"""Fetching `http(s)` image URLs for untrusted clients without becoming an open proxy into our own network.

Each hop (the URL and every redirect) is resolved first and refused if any address is loopback, private,
link-local (cloud metadata lives at 169.254.169.254) or otherwise not globally routable; the connection then goes
to the address that was checked, so a DNS answer cannot change between check and use. Bytes are counted while they
stream in, and the whole fetch has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

# Some CDNs label images generically; anything else (text/html: a login page, an error page) is refused.
_GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})


@dataclass(frozen=True)
class FetchPolicy:
    enabled: bool
    allowed_hosts: frozenset[str]  # empty: any public host; else only these (and their subdomains), trusted
    connect_timeout: float
    total_timeout: float
    max_redirects: int
    max_bytes: int


class FetchRefused(InvalidRequest):
    def __init__(self, url: str, reason: str, param: str):
        host = urlsplit(url).hostname or url
        super().__init__(f"image URL host {host!r}: {reason}", param=param, code="image_fetch_failed")


class ImageFetcher:
    def __init__(self, policy: FetchPolicy):
        self._policy = policy
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(policy.total_timeout, connect=policy.connect_timeout),
            headers={"User-Agent": "shizhen-serve image fetcher", "Accept": "image/*"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, param: str) -> bytes:
        policy = self._policy
        if not policy.enabled:
            raise InvalidRequest("remote image URLs are switched off on this server; send a data: URL instead",
                                 param=param, code="image_fetch_disabled")
        try:
            async with asyncio.timeout(policy.total_timeout):
                for _ in range(policy.max_redirects + 1):
                    redirect = await self._fetch_once(url, param)
                    if isinstance(redirect, bytes):
                        return redirect
                    url = redirect
        except TimeoutError:
            raise FetchRefused(url, f"timed out after {policy.total_timeout:g} s", param) from None
        except httpx.HTTPError as exc:
            raise FetchRefused(url, f"could not be fetched ({type(exc).__name__}: {exc})", param) from None
        raise FetchRefused(url, f"more than {policy.max_redirects} redirects", param)

    async def _fetch_once(self, url: str, param: str) -> bytes | str:
        """The image's bytes, or the URL a redirect points to."""
        pinned_url, host = await self._checked(url, param)
        request = self._client.build_request("GET", pinned_url, headers={"Host": _host_header(url)},
                                             extensions={"sni_hostname": host})
        response = await self._client.send(request, stream=True)
        try:
            if response.is_redirect:
                return urljoin(url, response.headers.get("location", ""))
            if response.status_code != 200:
                raise FetchRefused(url, f"answered HTTP {response.status_code}", param)
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not (content_type.startswith("image/") or content_type in _GENERIC_TYPES):
                raise UnsupportedMediaType(f"image URL answered with content-type {content_type or 'none'!r}, "
                                           "not an image", param=param, code="unsupported_media_type")
            return await self._read_capped(response, url, param)
        finally:
            await response.aclose()

    async def _read_capped(self, response: httpx.Response, url: str, param: str) -> bytes:
        limit = self._policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"image at {urlsplit(url).hostname!r} is {declared} bytes, over the {limit} "
                                  "byte limit", param=param, code="image_too_large")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"image at {urlsplit(url).hostname!r} is over the {limit} byte limit",
                                      param=param, code="image_too_large")
        return bytes(body)

    async def _checked(self, url: str, param: str) -> tuple[str, str]:
        """Validate the URL and its addresses; returns the URL rewritten to the checked address, and the host."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"image URL {url[:80]!r} must be http(s) or a data: URL", param=param,
                                 code="invalid_image_url")
        host = parts.hostname.lower()
        trusted = self._allowed(host)
        if self._policy.allowed_hosts and not trusted:
            raise FetchRefused(url, "not in this server's allow-list of image hosts", param)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchRefused(url, f"could not be resolved ({exc.strerror})", param) from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not trusted:
            for address in addresses:
                if not address.is_global:
                    raise FetchRefused(url, f"resolves to {address}, a private, loopback or link-local address; "
                                       "refused", param)
        address = addresses[0]
        netloc = f"[{address}]" if address.version == 6 else str(address)
        return urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path or "/", parts.query, "")), host

    def _allowed(self, host: str) -> bool:
        return any(host == allowed or host.endswith("." + allowed) for allowed in self._policy.allowed_hosts)


def _host_header(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1]
