"""TLS for servers on loopback: certificates from a private authority, and client
contexts that trust it (the system's default contexts never do)."""

from __future__ import annotations

import ssl

import trustme


def server_context(authority: trustme.CA, certified_name: str) -> ssl.SSLContext:
    """A server-side context whose certificate names ``certified_name``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(certified_name).configure_cert(context)
    return context


def trusting(authority: trustme.CA) -> ssl.SSLContext:
    """A client context that verifies certificates against ``authority`` (and host names)."""
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context
