"""The station's OCMF signing key on the board's file system, with the portable P-256 signer.

The key file is a PKCS#8 PEM private key, the same format the CPython port writes, so a key
can move between a Linux controller and a board. Created on first start from
``os.urandom`` (the ESP32's hardware random number generator; keep Wi-Fi or Bluetooth on, or
the RNG's entropy source is weaker — see the ESP-IDF documentation of ``esp_random``),
written atomically (temp file + rename on littlefs).
"""

import binascii
import os

from . import p256

PEM_HEADER = "-----BEGIN PRIVATE KEY-----"
PEM_FOOTER = "-----END PRIVATE KEY-----"


def _random_scalar():
    if not hasattr(os, "urandom"):
        raise OSError("this MicroPython build has no os.urandom: cannot create a signing key")
    while True:
        d = int.from_bytes(os.urandom(32), "big")
        if 1 <= d < p256.N:
            return d


def pem_of(d):
    body = binascii.b2a_base64(p256.private_key_to_der(d)).decode().strip()
    return "%s\n%s\n%s\n" % (PEM_HEADER, body, PEM_FOOTER)


def scalar_of_pem(text):
    lines = [line.strip() for line in text.splitlines()]
    if not lines or not lines[0].startswith("-----BEGIN") or "PRIVATE KEY" not in lines[0]:
        raise ValueError("not a PEM private key")
    body = "".join(line for line in lines[1:] if line and not line.startswith("-----"))
    return p256.private_key_from_der(binascii.a2b_base64(body))


def file_key_signer(path, fs_write_atomic):
    """A ``p256.Signer`` over the key in ``path``, creating it when missing.

    ``fs_write_atomic(path, data)`` writes the new key all or nothing."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        d = _random_scalar()
        fs_write_atomic(path, pem_of(d).encode())
        signer = p256.Signer(d)
        signer.created = True
        return signer
    signer = p256.Signer(scalar_of_pem(text))
    signer.created = False
    return signer
