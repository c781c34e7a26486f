"""The dashboard's session cookie and its CSRF tokens.

A sign-in makes a random session id. The browser gets it signed (itsdangerous, with a
timestamp: a cookie past ``BILLING_SESSION_HOURS`` is refused even if replayed) in an
``HttpOnly; SameSite=Strict`` cookie scoped to ``/dashboard``; the database keeps only the
id's SHA-256 with who signed in, so sign-out (or a revoked key) ends the session in every
gateway process at once. No key or token is ever put in the cookie, a URL or a page.

Forms carry a CSRF token: before sign-in, a signed random nonce that must match the
``billing_csrf`` cookie (double submit: another site can neither read the cookie nor set
it); after sign-in, an HMAC of the session id. Both cookies are SameSite=Strict, so a
cross-site POST carries neither, and a request whose ``Origin`` is another site is refused
(the site is ``BILLING_PUBLIC_URL`` behind a proxy, else the request's scheme and host).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, TimestampSigner

SESSION_COOKIE = "billing_session"
CSRF_COOKIE = "billing_csrf"
PATH = "/dashboard"
SIGN_IN_FORM_SECONDS = 3600
"""How long a sign-in form stays usable."""


@dataclass(frozen=True, slots=True)
class SignInForm:
    nonce: str
    """For the ``billing_csrf`` cookie."""
    token: str
    """For the form's hidden field: the nonce, signed."""


class SessionKeys:
    """Signs and checks session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes, hours: float) -> None:
        self._secret = secret
        self._sessions = TimestampSigner(secret, salt="billing-dashboard-session")
        self._forms = TimestampSigner(secret, salt="billing-dashboard-sign-in")
        self.max_age = int(hours * 3600)

    @staticmethod
    def new_session_id() -> str:
        return secrets.token_urlsafe(32)

    @staticmethod
    def digest(session_id: str) -> bytes:
        """What the database keeps of a session id."""
        return hashlib.sha256(session_id.encode()).digest()

    def cookie(self, session_id: str) -> str:
        return self._sessions.sign(session_id).decode()

    def session_id(self, cookie: str | None) -> str | None:
        """The session id of a cookie this gateway signed within ``max_age``, else ``None``."""
        if not cookie:
            return None
        try:
            return self._sessions.unsign(cookie, max_age=self.max_age).decode()
        except (BadSignature, UnicodeDecodeError):
            return None

    def csrf(self, session_id: str) -> str:
        """The CSRF token of a signed-in session's forms."""
        return hmac.new(self._secret, b"csrf:" + session_id.encode(), "sha256").hexdigest()

    def csrf_matches(self, session_id: str, token: str) -> bool:
        return hmac.compare_digest(self.csrf(session_id).encode(), token.encode())

    def sign_in_form(self) -> SignInForm:
        nonce = secrets.token_urlsafe(24)
        return SignInForm(nonce, self._forms.sign(nonce).decode())

    def sign_in_matches(self, cookie: str | None, token: str) -> bool:
        """Whether the form's token is a recent signature of the cookie's nonce."""
        if not cookie or not token:
            return False
        try:
            nonce = self._forms.unsign(token, max_age=SIGN_IN_FORM_SECONDS)
        except BadSignature:
            return False
        return hmac.compare_digest(nonce, cookie.encode())


def same_origin(origin: str | None, site: str) -> bool:
    """A form's ``Origin`` (absent on some same-origin requests) is ``site``
    (``scheme://host[:port]``)."""
    return origin is None or origin == site
