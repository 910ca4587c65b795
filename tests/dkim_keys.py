"""A DKIM signing key made for a test, and the DNS answer that publishes it."""

from __future__ import annotations

import base64

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class Keys:
    """One signing domain's key pair, and the DNS TXT record that publishes it."""

    def __init__(self, domain: str = "corp.example", selector: str = "s1") -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.domain, self.selector = domain, selector
        self.private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
        self.lookups: list[bytes] = []

    def dns(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        self.lookups.append(name)
        wanted = f"{self.selector}._domainkey.{self.domain}.".encode()
        return self.record if name == wanted else None

    def sign(self, raw: bytes, selector: str | None = None, **options: object) -> bytes:
        """`raw` with a DKIM-Signature on top (under another `selector` if given)."""
        chosen = (selector or self.selector).encode()
        signature: bytes = dkim.sign(raw, chosen, self.domain.encode(), self.private, **options)
        return signature + raw
