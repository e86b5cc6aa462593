"""Who may call the API: HTTP basic (`--api-auth USER:PASS[,USER:PASS...]`, A1111's flag) or a bearer token
(`--token`). Required for a server bound to anything but a loopback address; optional on 127.0.0.1."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
import socket
from dataclasses import dataclass, field

from fastapi import HTTPException, Request

PAGE_HEADER = "x-fastsd-page"  # sent by the page's own API calls (static/app.js)


@dataclass(frozen=True, eq=False)  # hashed by identity: FastAPI caches dependencies by it
class Auth:
    users: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    @classmethod
    def parse(cls, api_auth: str | None, token: str | None) -> Auth | None:
        """None when neither is given; ValueError (one line) for a malformed --api-auth."""
        users = {}
        for pair in (api_auth or "").split(","):
            if not pair:
                continue
            user, sep, password = pair.partition(":")
            if not sep or not user or not password:
                raise ValueError("--api-auth takes USER:PASS (several separated by commas), with a non-empty "
                                 "user and password")
            users[user] = password
        if token is not None and not token:
            raise ValueError("--token must not be empty")
        return cls(users, token) if users or token else None

    def _ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token:
            return secrets.compare_digest(value.encode(), self.token.encode())
        if scheme == "basic" and self.users:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            expected = self.users.get(user)
            return expected is not None and secrets.compare_digest(password.encode(), expected.encode())
        return False

    def __call__(self, request: Request) -> None:
        """A FastAPI dependency: 401 unless the request carries valid credentials."""
        if not self._ok(request.headers.get("authorization", "")):
            challenge = 'Basic realm="fastsd"' if self.users else "Bearer"
            # no challenge to fastsd's own page: a browser would hold its fetch behind a login dialog
            headers = {} if request.headers.get(PAGE_HEADER) else {"WWW-Authenticate": challenge}
            raise HTTPException(401, "authentication required (this server was started with "
                                f"{'--api-auth' if self.users else '--token'})", headers=headers)


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)
