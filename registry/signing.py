"""Signing keys for model versions: only the training tasks can sign, everyone can check.

A registry login may write any tag of a version it can edit, so hashes in a tag prove nothing
about who registered the files. The register stage therefore signs each version's manifest
with an ed25519 key that only the training tasks hold (`signing.key_file`, PEM), and every
loader checks that signature against the public keys it trusts (`signing.trusted_keys_file`:
OpenSSH `ssh-ed25519` lines, like `authorized_keys`) before any file is unpickled.

Why ed25519 through `cryptography` rather than OpenSSF's `model-signing`: `cryptography` is
already installed (MLflow and Airflow depend on it), the signature must cover the registry's
own facts (model name, version and run, not only files) and live in a version tag, and
`model-signing` would add sigstore's stack for a key-pair mode that is one call here.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from config.private import write_private

KEY_COMMENT = "insect-model-signing"


class UntrustedModelError(RuntimeError):
    """A model version that was not signed by a trusted key, or whose files are not the signed ones."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint naming a key in signatures and logs (sha256 of its raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_line(public_key: Ed25519PublicKey) -> str:
    openssh = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{openssh} {KEY_COMMENT}-{key_id(public_key)}"


def _load_private(key_file: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError:
        raise UntrustedModelError(
            f"no model-signing key at {key_file}: create one with `python -m registry signing-key create`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UntrustedModelError(f"{key_file} is not an ed25519 private key")
    return key


def trusted_keys(trusted_file: Path) -> dict[str, Ed25519PublicKey]:
    """The trusted public keys by key id; none when the file does not exist."""
    keys = {}
    lines = trusted_file.read_text().splitlines() if trusted_file.exists() else []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            key = serialization.load_ssh_public_key(" ".join(line.split()[:2]).encode())
            if isinstance(key, Ed25519PublicKey):
                keys[key_id(key)] = key
    return keys


def _write_trusted(trusted_file: Path, keys: list[Ed25519PublicKey]) -> None:
    # public keys, but written the same atomic way: a crash leaves the old list whole
    write_private(trusted_file, "".join(f"{_public_line(key)}\n" for key in keys))
    trusted_file.chmod(0o644)


def create_key(key_file: Path, trusted_file: Path) -> str:
    """A new signing key at `key_file` (owner-only), its public key added to `trusted_file`;
    an existing key is kept (and trusted). Returns the key's id."""
    if not key_file.exists():
        write_private(key_file, _pem(Ed25519PrivateKey.generate()))
    public = _load_private(key_file).public_key()
    if key_id(public) not in trusted_keys(trusted_file):
        _write_trusted(trusted_file, [*trusted_keys(trusted_file).values(), public])
    return key_id(public)


def replace_key(key_file: Path, trusted_file: Path) -> str:
    """The first half of a rotation: a new key at `key_file`, trusted beside the old ones (so
    versions signed before stay loadable until they are signed again). Returns its id."""
    new = Ed25519PrivateKey.generate()
    _write_trusted(trusted_file, [*trusted_keys(trusted_file).values(), new.public_key()])
    write_private(key_file, _pem(new))  # trusted first: a crash in between leaves no untrusted signer
    return key_id(new.public_key())


def trust_only(key_file: Path, trusted_file: Path) -> None:
    """The last half of a rotation: only `key_file`'s key stays trusted."""
    _write_trusted(trusted_file, [_load_private(key_file).public_key()])


def _pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def sign(key_file: Path, payload: bytes) -> str:
    """`<key id>:<base64 signature>` of `payload`."""
    key = _load_private(key_file)
    return f"{key_id(key.public_key())}:{base64.b64encode(key.sign(payload)).decode()}"


def verify(trusted_file: Path, payload: bytes, signature: str) -> str:
    """The id of the trusted key that signed `payload`; UntrustedModelError otherwise."""
    signer, _, encoded = signature.partition(":")
    key = trusted_keys(trusted_file).get(signer)
    if key is None:
        raise UntrustedModelError(f"signed by key {signer or '?'}, which is not in {trusted_file}")
    try:
        key.verify(base64.b64decode(encoded, validate=True), payload)
    except (InvalidSignature, ValueError):
        raise UntrustedModelError(f"the signature by key {signer} does not match the manifest") from None
    return signer
