"""The station's signing key for OCMF documents: a P-256 private key in a PEM file.

Created on first start (mode 0600, written atomically) and reused afterwards, so the
public key handed to operators and verifiers stays the same for the station's life.
The key lives in OpenSSL's libcrypto (``libcrypto.py``): constant-time P-256, and already
mapped by Python, so the agent does not load the ``cryptography`` package (10.9 MB
resident, see ``libcrypto.py``).
"""

import os

from .libcrypto import Key, OpenSSLError

KEY_MODE = 0o600


class KeyFileError(ValueError):
    """The key file exists but cannot be used: unreadable, not a P-256 key, or exposed."""


class FileKeySigner:
    """ECDSA P-256 / SHA-256 signer over the private key stored at ``path``.

    Offers what ``ocmf.sign_document`` needs: ``sign(data)`` -> DER signature bytes,
    ``verify(data, signature)`` for the console's checks, and ``public_key_hex()`` (hex of
    the DER SubjectPublicKeyInfo) to publish for verifiers.
    """

    def __init__(self, path):
        self.path = path
        self.created = False
        try:
            self._key = self._load(path)
        except FileNotFoundError:
            self._key = self._create(path)
            self.created = True

    @staticmethod
    def _load(path):
        """The private key in ``path``; KeyFileError if the file is exposed or not P-256."""
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode & 0o777
            data = file.read()
        if mode & ~KEY_MODE:
            raise KeyFileError(
                "signing key %s has mode %04o: others may read it. It must be 0600 "
                "(chmod 600 %s) — and if it was exposed, replace it" % (path, mode, path))
        try:
            key = Key.from_pem(data)
        except OpenSSLError as error:
            raise KeyFileError("signing key %s is not an unencrypted PEM private key: %s"
                               % (path, error)) from error
        if not key.is_p256():
            raise KeyFileError("signing key %s is %s, OCMF signing here needs a P-256 "
                               "(secp256r1) key" % (path, key.kind()))
        return key

    @staticmethod
    def _create(path):
        """A new P-256 key, written to ``path`` (PKCS8 PEM, mode 0600) all or nothing."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        key = Key.generate_p256()
        pem = key.private_pem()
        temp = "%s.tmp-%d" % (path, os.getpid())
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
        try:
            os.fchmod(fd, KEY_MODE)  # whatever the umask
            os.write(fd, pem)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        os.rename(temp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        return key

    def sign(self, data):
        """DER-encoded ECDSA signature of ``data`` (bytes), hashed with SHA-256."""
        return self._key.sign_sha256(data)

    def verify(self, data, signature):
        """True if ``signature`` (DER) is this key's signature of ``data``."""
        return self._key.verify_sha256(data, signature)

    def public_key_der(self):
        """The public key as DER SubjectPublicKeyInfo bytes."""
        return self._key.public_der()

    def public_key_hex(self):
        """Upper-case hex of the DER SubjectPublicKeyInfo, the form OCMF verifiers take."""
        return self.public_key_der().hex().upper()

    def public_key_pem(self):
        """The public key as PEM text (``-----BEGIN PUBLIC KEY-----``)."""
        return self._key.public_pem().decode()
