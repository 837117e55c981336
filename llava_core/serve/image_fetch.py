"""Fetch the bytes of an http(s) `image_url` (or `video_url`), without letting a client turn the server into a proxy.

Only hosts on the workflow's allowlist (`serve.image_url_hosts`, empty by default) are fetched; any other URL is
refused before a name is even looked up. The host name is resolved once, every address it resolves to is checked
(private, loopback, link-local, reserved and multicast addresses are refused unless `serve.allow_private_image_hosts`),
and the connection goes to the address that was checked, so a second DNS answer cannot swap in an internal address.
TLS still verifies the certificate against the host name. Redirects are not followed (their target would skip these
checks), and both the size (`serve.max_image_bytes`, videos `serve.max_video_bytes`) and the time
(`serve.image_fetch_timeout_s`) are bounded. Videos follow the same host rules as images.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse

from llava_core.config import ServeSettings
from llava_core.serve.errors import bad_request

CHUNK_BYTES = 64 * 1024


def fetch_image_bytes(url: str, settings: ServeSettings, param: str) -> bytes:
    return fetch_media_bytes(url, settings, param, "image", settings.max_image_bytes)


def fetch_media_bytes(url: str, settings: ServeSettings, param: str, medium: str, max_bytes: int) -> bytes:
    """The bytes at `url`, an image's or a video's (`medium`), at most `max_bytes` of them."""
    target = urllib.parse.urlsplit(url)
    host, port = host_and_port(target, param)
    allowed = {h.lower().rstrip(".") for h in settings.image_url_hosts}
    if host not in allowed:
        hint = f"allowed hosts: {', '.join(sorted(allowed))}" if allowed else f"this server fetches no {medium} URLs"
        raise bad_request(f"{medium} URL host {host!r} is not allowed ({hint}); send the {medium} inline as a "
                          f"data:{medium}/...;base64,... URL", param, f"{medium}_host_not_allowed")
    address = checked_address(host, port, settings.allow_private_image_hosts, param)
    path = target.path or "/"
    if target.query:
        path += "?" + target.query
    return download(target.scheme.lower(), host, port, address, path, settings, param, medium, max_bytes)


def host_and_port(target: urllib.parse.SplitResult, param: str) -> tuple[str, int]:
    try:
        port = target.port or (443 if target.scheme.lower() == "https" else 80)
    except ValueError:
        raise bad_request("the image URL has an invalid port", param, "invalid_image_url") from None
    if not target.hostname:
        raise bad_request("the image URL has no host", param, "invalid_image_url")
    if target.username or target.password:
        raise bad_request("image URLs with credentials are not accepted", param, "invalid_image_url")
    return target.hostname.lower().rstrip("."), port


def resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return ip.is_global and not ip.is_multicast


def checked_address(host: str, port: int, allow_private: bool, param: str) -> str:
    """The address to connect to, after checking every address the name resolves to."""
    try:
        addresses = resolve(host, port)
    except (socket.gaierror, UnicodeError) as error:
        raise bad_request(f"image URL host {host!r} could not be resolved: {error}", param,
                          "image_fetch_failed") from None
    if not addresses:
        raise bad_request(f"image URL host {host!r} has no address", param, "image_fetch_failed")
    if not allow_private:
        internal = [a for a in addresses if not is_public_address(a)]
        if internal:
            raise bad_request(f"image URL host {host!r} resolves to a private or reserved address ({internal[0]}); "
                              "such hosts are not fetched", param, "image_host_not_allowed")
    return addresses[0]


class PinnedHTTPConnection(http.client.HTTPConnection):
    """Speaks to `host` (Host header) at an address chosen beforehand, not at whatever `host` resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self.socket = socket.create_connection((self.address, self.port), self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        # The certificate must name the host, whichever address it was reached at.
        self.sock = self.socket = self._context.wrap_socket(sock, server_hostname=self.host)


def download(scheme: str, host: str, port: int, address: str, path: str, settings: ServeSettings,
             param: str, medium: str = "image", max_bytes: int | None = None) -> bytes:
    max_bytes = settings.max_image_bytes if max_bytes is None else max_bytes
    connection_class = PinnedHTTPSConnection if scheme == "https" else PinnedHTTPConnection
    deadline = time.monotonic() + settings.image_fetch_timeout_s
    connection = connection_class(host, port, address, settings.image_fetch_timeout_s)
    try:
        connection.request("GET", path, headers={"User-Agent": "llava-ray", "Accept": f"{medium}/*"})
        response = connection.getresponse()
        check_response(response, max_bytes, param, medium)
        return read_limited(response, connection, max_bytes, deadline, param, medium)
    except TimeoutError:
        raise fetch_failed(f"no answer within {settings.image_fetch_timeout_s:g}s", param, medium) from None
    except (OSError, http.client.HTTPException) as error:
        raise fetch_failed(f"{type(error).__name__}: {error}", param, medium) from None
    finally:
        connection.close()


def check_response(response: http.client.HTTPResponse, max_bytes: int, param: str, medium: str = "image") -> None:
    if 300 <= response.status < 400:
        raise fetch_failed(f"HTTP {response.status} redirect; redirects are not followed, use the final URL", param,
                           medium)
    if response.status != 200:
        raise fetch_failed(f"HTTP {response.status}", param, medium)
    declared = response.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise bad_request(f"the {medium} is {declared} bytes, over the limit of {max_bytes} bytes", param,
                          f"{medium}_too_large")


def read_limited(response: http.client.HTTPResponse, connection: http.client.HTTPConnection, max_bytes: int,
                 deadline: float, param: str, medium: str = "image") -> bytes:
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError()
        # The whole download, not each read, has the time limit. (`connection.sock` is gone once http.client knows
        # the server closes after this response; the socket the connection opened is still the one being read.)
        connection.socket.settimeout(remaining)
        chunk = response.read1(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise bad_request(f"the {medium} is larger than the limit of {max_bytes} bytes", param,
                              f"{medium}_too_large")
        chunks.append(chunk)


def fetch_failed(reason: str, param: str, medium: str = "image"):
    return bad_request(f"the {medium} URL could not be fetched: {reason}", param, f"{medium}_fetch_failed")
