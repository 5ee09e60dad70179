"""CURVE key pairs for the relay, in pyzmq's certificate format.

    loadsvc keys gen DIR NAME   ->  DIR/NAME.key (public), DIR/NAME.key_secret (0600)

The collector's node holds its own secret and its publishers' public keys (the
authorized directory); each publisher holds its own secret and the collector's
public key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq.auth

__all__ = ["generate_keys", "load_public", "load_secret"]

log = logging.getLogger("loadsvc.relay")


def generate_keys(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600) in pyzmq's format.

    An existing, readable pair is kept as it is (delete both files to rotate),
    so a start-up script may call this every time.
    """
    directory = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name must be a plain file name, got {name!r}")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() and secret.exists():
        try:
            pub, sec = zmq.auth.load_certificate(secret)
            if sec is not None and zmq.auth.load_certificate(public)[0] == pub:
                log.info("keeping the existing key pair %s, %s", public, secret)
                return public, secret
        except (OSError, ValueError):
            pass
        raise ValueError(f"{public} and {secret} exist but are not a matching key pair; "
                         "remove them to generate a new one")
    directory.mkdir(parents=True, exist_ok=True)
    pub_path, sec_path = zmq.auth.create_certificates(directory, name)
    os.chmod(sec_path, 0o600)
    return Path(pub_path), Path(sec_path)


def _load_certificate(path: Path, what: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a pyzmq certificate file; ValueError naming the file."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: cannot read a pyzmq certificate ({e}); create one "
                         "with `loadsvc keys gen DIR NAME`") from e


def load_public(path: Path, what: str) -> bytes:
    public, _ = _load_certificate(path, what)
    if not public:
        raise ValueError(f"{what} {path}: no public-key in the certificate")
    return public


def load_secret(path: Path, what: str) -> tuple[bytes, bytes]:
    public, secret = _load_certificate(path, what)
    if not secret:
        raise ValueError(f"{what} {path}: this is a public certificate; pass the NAME.key_secret file")
    return public, secret
