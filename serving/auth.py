"""API-key authentication: keys from the environment or a file, checked in constant time.

Why keys and not OAuth: the service sits behind a company network or a gateway; a shared
secret per caller is what such callers can send, and it is enough to keep a stray script
(or the whole internet, if someone binds 0.0.0.0) from using the model. Keys are kept only
as SHA-256 digests in memory and compared with :func:`hmac.compare_digest`, so neither a
timing difference nor a memory dump of the key set hands a key out.

Sources, merged: ``DOMAINFLOW_API_KEYS`` (comma-separated) and ``DOMAINFLOW_API_KEYS_FILE``
(one key per line; blank lines and ``#`` comments ignored). A service with no key at all
refuses to start: "open by accident" is the failure this module exists to prevent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from fastapi import HTTPException, Security, status
from fastapi.security import APIKeyHeader

API_KEY_HEADER = "X-API-Key"
KEYS_ENV = "DOMAINFLOW_API_KEYS"
KEYS_FILE_ENV = "DOMAINFLOW_API_KEYS_FILE"
MIN_KEY_LENGTH = 16
# What the service says about itself beyond "the process is up": which domains, which versions, how much
# traffic (metrics), and the full API surface (docs). Behind the key unless ServingConfig.protect_operational
# is off. /healthz stays open (it says nothing but "ok"); /readyz stays open for orchestrators, without details.
OPERATIONAL_PATHS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_BASIC_CHALLENGE = 'Basic realm="domainflow", charset="UTF-8"'


class AuthConfigError(ValueError):
    """No usable key was configured, or a configured key is unusable."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_keys_file(path: str | Path) -> list[str]:
    """Keys from a file: one per line, blank lines and ``#`` comments skipped."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AuthConfigError(f"cannot read API keys file {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class ApiKeys:
    """A set of accepted keys (as digests)."""

    def __init__(self, keys: Iterable[str]) -> None:
        keys = [k.strip() for k in keys if k and k.strip()]
        if not keys:
            raise AuthConfigError(
                f"no API key configured: set {KEYS_ENV}=key1,key2 or {KEYS_FILE_ENV}=/path/to/keys "
                f"(e.g. export {KEYS_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))'))"
            )
        short = [k for k in keys if len(k) < MIN_KEY_LENGTH]
        if short:
            raise AuthConfigError(
                f"{len(short)} API key(s) shorter than {MIN_KEY_LENGTH} characters: use long random keys"
            )
        self._digests = tuple(dict.fromkeys(_digest(k) for k in keys))

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, keys_file: str | Path | None = None) -> ApiKeys:
        """Keys from ``DOMAINFLOW_API_KEYS`` and the keys file (``keys_file`` overrides the env variable)."""
        environ = os.environ if environ is None else environ
        keys = [k for k in environ.get(KEYS_ENV, "").split(",")]
        file = keys_file or environ.get(KEYS_FILE_ENV)
        if file:
            keys += read_keys_file(file)
        return cls(keys)

    def accepts(self, presented: str | None) -> bool:
        """Constant time in the key's content: every stored digest is compared, match or not."""
        if not presented:
            return False
        digest = _digest(presented)
        found = False
        for stored in self._digests:
            found |= hmac.compare_digest(digest, stored)
        return found


def _header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    value = next((value for key, value in headers if key == name), None)
    return None if value is None else value.decode("latin-1")


def _key_from_authorization(value: str | None) -> str | None:
    """The key in ``Authorization: Bearer KEY`` or ``Basic base64(any-user:KEY)``.

    Why besides ``X-API-Key``: the readers of the operational endpoints cannot always set a header of
    their own. A browser opening /docs answers a Basic challenge with a login prompt (the key is the
    password), and Prometheus scrapes with ``basic_auth`` or ``authorization: {credentials_file}``.
    """
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def operational_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request to an operational endpoint presents: ``X-API-Key``, else from ``Authorization``."""
    headers = list(headers)
    return _header_value(headers, API_KEY_HEADER.lower().encode("latin-1")) or _key_from_authorization(
        _header_value(headers, b"authorization")
    )


_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="An API key configured on the server.")


def require_api_key(keys: ApiKeys):
    """A FastAPI dependency that lets a request through only with an accepted ``X-API-Key``.

    Declared through :class:`APIKeyHeader` so the OpenAPI docs show the scheme (and /docs offers
    an "Authorize" button). 401 carries ``WWW-Authenticate`` as RFC 9110 asks.
    """

    async def dependency(presented: str | None = Security(_header)) -> None:
        if presented is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                f"missing API key: send it in the {API_KEY_HEADER} header",
                headers={"WWW-Authenticate": "ApiKey"},
            )
        if not keys.accepts(presented):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "ApiKey"})

    return dependency


class ApiKeyMiddleware:
    """Checks the key before anything else reads the request (ASGI, outermost after metrics).

    Why here and not only in the route dependency: FastAPI parses the JSON body before it runs
    dependencies, so a keyless request with a malformed body would get a 422 describing the
    body. With the check first, whoever has no key learns nothing but 401. The route dependency
    stays, to document the scheme in OpenAPI and to guard any route added outside the prefix.

    ``protected_paths`` (the operational endpoints, when protected) take the key in ``X-API-Key``
    or in ``Authorization`` (see :func:`operational_key`); their 401 also carries a Basic
    challenge, so a browser asks for the key instead of showing a bare error.
    """

    def __init__(self, app, keys: ApiKeys, protected_prefix: str = "/v1/", protected_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.keys = keys
        self.protected_prefix = protected_prefix
        self.protected_paths = frozenset(protected_paths)
        self._header = API_KEY_HEADER.lower().encode("latin-1")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            operational = path in self.protected_paths
            if operational or path.startswith(self.protected_prefix):
                headers = scope.get("headers", ())
                presented = operational_key(headers) if operational else _header_value(headers, self._header)
                if presented is None or not self.keys.accepts(presented):
                    from fastapi.responses import JSONResponse

                    detail = (
                        f"missing API key: send it in the {API_KEY_HEADER} header"
                        if presented is None
                        else "invalid API key"
                    )
                    response = JSONResponse(
                        {"detail": detail},
                        status_code=status.HTTP_401_UNAUTHORIZED,
                        headers={"WWW-Authenticate": "ApiKey"},
                    )
                    if operational:
                        response.headers.append("WWW-Authenticate", _BASIC_CHALLENGE)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
