"""P-256 ECDSA keys through the OpenSSL libcrypto that Python's own ``_hashlib`` maps.

Why not the ``cryptography`` package: memory. With it the agent held 41.3 MB resident with a
car charging, with this 30.5 MB, the hand-written pymodbus + paho loop 28.5 MB
(``python -m evse_tools.bench_cpu --window 240``); the libcrypto used here is already mapped
for ``hashlib``/``ssl`` (paho imports them). OpenSSL's P-256 is constant-time.

Contract: ``Key`` owns one ``EVP_PKEY`` and frees it; every other OpenSSL object is freed
before the call that made it returns. Only the OpenSSL 3 EVP API is called, never a
variadic function. A failing OpenSSL call raises ``OpenSSLError`` with OpenSSL's own
error strings. The library is located without a child process (``ctypes.util`` would spawn
one): from ``/proc/self/maps`` after importing ``_hashlib``, else by its soname.
"""

import ctypes

_P = ctypes.c_void_p
_PASSWORD_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_void_p)
P256_NAMES = ("prime256v1", "P-256", "secp256r1")


class OpenSSLError(ValueError):
    """An OpenSSL call failed; the message holds OpenSSL's error queue."""


def _library_path():
    """The path of the libcrypto this process already maps, or the soname to load."""
    try:
        import _hashlib  # noqa: F401  (links libcrypto; importing it maps the library)
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1]
                name = path.rsplit("/", 1)[-1]
                if name.startswith("libcrypto.so"):
                    return path
    except (ImportError, OSError):
        pass
    return "libcrypto.so.3"


_SIGNATURES = {
    # name: (restype, argtypes)
    "ERR_get_error": (ctypes.c_ulong, ()),
    "ERR_error_string_n": (None, (ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t)),
    "ERR_clear_error": (None, ()),
    "BIO_new_mem_buf": (_P, (ctypes.c_char_p, ctypes.c_int)),
    "BIO_new": (_P, (_P,)),
    "BIO_s_mem": (_P, ()),
    "BIO_ctrl_pending": (ctypes.c_size_t, (_P,)),
    "BIO_read": (ctypes.c_int, (_P, ctypes.c_char_p, ctypes.c_int)),
    "BIO_free": (ctypes.c_int, (_P,)),
    "PEM_read_bio_PrivateKey": (_P, (_P, _P, _PASSWORD_CALLBACK, _P)),
    "PEM_write_bio_PrivateKey": (ctypes.c_int, (_P, _P, _P, _P, ctypes.c_int, _P, _P)),
    "PEM_write_bio_PUBKEY": (ctypes.c_int, (_P, _P)),
    "EVP_PKEY_is_a": (ctypes.c_int, (_P, ctypes.c_char_p)),
    "EVP_PKEY_get0_type_name": (ctypes.c_char_p, (_P,)),
    "EVP_PKEY_get_group_name": (ctypes.c_int, (_P, ctypes.c_char_p, ctypes.c_size_t,
                                               ctypes.POINTER(ctypes.c_size_t))),
    "EVP_PKEY_get_size": (ctypes.c_int, (_P,)),
    "EVP_PKEY_free": (None, (_P,)),
    "EVP_PKEY_CTX_new_from_name": (_P, (_P, ctypes.c_char_p, ctypes.c_char_p)),
    "EVP_PKEY_CTX_set_group_name": (ctypes.c_int, (_P, ctypes.c_char_p)),
    "EVP_PKEY_keygen_init": (ctypes.c_int, (_P,)),
    "EVP_PKEY_keygen": (ctypes.c_int, (_P, ctypes.POINTER(_P))),
    "EVP_PKEY_CTX_free": (None, (_P,)),
    "EVP_sha256": (_P, ()),
    "EVP_MD_CTX_new": (_P, ()),
    "EVP_MD_CTX_free": (None, (_P,)),
    "EVP_DigestSignInit": (ctypes.c_int, (_P, _P, _P, _P, _P)),
    "EVP_DigestSign": (ctypes.c_int, (_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t),
                                      ctypes.c_char_p, ctypes.c_size_t)),
    "EVP_DigestVerifyInit": (ctypes.c_int, (_P, _P, _P, _P, _P)),
    "EVP_DigestVerify": (ctypes.c_int, (_P, ctypes.c_char_p, ctypes.c_size_t,
                                        ctypes.c_char_p, ctypes.c_size_t)),
    "i2d_PUBKEY": (ctypes.c_int, (_P, ctypes.POINTER(ctypes.c_char_p))),
}


def _load():
    lib = ctypes.CDLL(_library_path())
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_lib = _load()


def _no_password(buffer, size, rwflag, user):
    """PEM password callback: there is none, so an encrypted key fails instead of prompting."""
    return -1


_NO_PASSWORD = _PASSWORD_CALLBACK(_no_password)  # kept alive for as long as the module


def _errors():
    """OpenSSL's queued error strings, oldest first, and the queue emptied."""
    texts = []
    buffer = ctypes.create_string_buffer(256)
    while True:
        code = _lib.ERR_get_error()
        if not code:
            return "; ".join(texts) or "no OpenSSL error queued"
        _lib.ERR_error_string_n(code, buffer, len(buffer))
        texts.append(buffer.value.decode("ascii", "replace"))


def _check(ok, what):
    """``ok`` (a true test, a non-NULL pointer or a positive length); else OpenSSLError naming ``what``."""
    if not ok or (ok is not True and ok < 0):
        raise OpenSSLError("%s failed: %s" % (what, _errors()))
    return ok


def _read_bio(bio):
    """Everything written to the memory BIO ``bio``, as bytes."""
    size = _lib.BIO_ctrl_pending(bio)
    buffer = ctypes.create_string_buffer(size)
    got = _lib.BIO_read(bio, buffer, size) if size else 0
    _check(got == size, "BIO_read")
    return buffer.raw[:size]


class Key:
    """One OpenSSL private key (``EVP_PKEY``), freed with this object."""

    def __init__(self, pkey):
        self._pkey = pkey

    def __del__(self):
        if self._pkey:
            _lib.EVP_PKEY_free(self._pkey)
            self._pkey = None

    @classmethod
    def from_pem(cls, data):
        """The private key in PEM ``data`` (PKCS8 or SEC1, unencrypted); OpenSSLError if not."""
        _lib.ERR_clear_error()
        data = bytes(data)
        bio = _check(_lib.BIO_new_mem_buf(data, len(data)), "BIO_new_mem_buf")
        try:
            pkey = _lib.PEM_read_bio_PrivateKey(bio, None, _NO_PASSWORD, None)
            _check(pkey, "PEM_read_bio_PrivateKey")
        finally:
            _lib.BIO_free(bio)
        return cls(pkey)

    @classmethod
    def generate_p256(cls):
        """A new random P-256 key."""
        _lib.ERR_clear_error()
        ctx = _check(_lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None), "EVP_PKEY_CTX_new_from_name")
        try:
            _check(_lib.EVP_PKEY_keygen_init(ctx) == 1, "EVP_PKEY_keygen_init")
            _check(_lib.EVP_PKEY_CTX_set_group_name(ctx, b"P-256") == 1, "EVP_PKEY_CTX_set_group_name")
            pkey = _P()
            _check(_lib.EVP_PKEY_keygen(ctx, ctypes.byref(pkey)) == 1, "EVP_PKEY_keygen")
        finally:
            _lib.EVP_PKEY_CTX_free(ctx)
        return cls(pkey.value)

    def kind(self):
        """The curve name for an EC key (OpenSSL's: ``prime256v1``, ``secp384r1``), else the type."""
        if _lib.EVP_PKEY_is_a(self._pkey, b"EC") != 1:
            name = _lib.EVP_PKEY_get0_type_name(self._pkey)
            return "%s private key" % (name.decode() if name else "unknown")
        buffer = ctypes.create_string_buffer(64)
        length = ctypes.c_size_t()
        _lib.ERR_clear_error()
        _check(_lib.EVP_PKEY_get_group_name(self._pkey, buffer, len(buffer), ctypes.byref(length)) == 1,
               "EVP_PKEY_get_group_name")
        return buffer.value.decode()

    def is_p256(self):
        """True for an EC key on the P-256 curve."""
        return self.kind() in P256_NAMES

    def private_pem(self):
        """The private key as unencrypted PKCS8 PEM bytes (``-----BEGIN PRIVATE KEY-----``)."""
        return self._write(lambda bio: _lib.PEM_write_bio_PrivateKey(bio, self._pkey, None, None, 0,
                                                                      None, None),
                           "PEM_write_bio_PrivateKey")

    def public_pem(self):
        """The public key as SubjectPublicKeyInfo PEM bytes."""
        return self._write(lambda bio: _lib.PEM_write_bio_PUBKEY(bio, self._pkey), "PEM_write_bio_PUBKEY")

    @staticmethod
    def _write(write, what):
        _lib.ERR_clear_error()
        bio = _check(_lib.BIO_new(_lib.BIO_s_mem()), "BIO_new")
        try:
            _check(write(bio) == 1, what)
            return _read_bio(bio)
        finally:
            _lib.BIO_free(bio)

    def public_der(self):
        """The public key as DER SubjectPublicKeyInfo bytes."""
        _lib.ERR_clear_error()
        size = _check(_lib.i2d_PUBKEY(self._pkey, None), "i2d_PUBKEY")
        buffer = ctypes.create_string_buffer(size)
        cursor = ctypes.c_char_p(ctypes.addressof(buffer))  # i2d_PUBKEY moves it past the output
        _check(_lib.i2d_PUBKEY(self._pkey, ctypes.byref(cursor)) == size, "i2d_PUBKEY")
        return buffer.raw

    def sign_sha256(self, data):
        """DER ECDSA signature of ``data`` (bytes) with SHA-256."""
        data = bytes(data)
        _lib.ERR_clear_error()
        size = ctypes.c_size_t(_lib.EVP_PKEY_get_size(self._pkey))
        signature = ctypes.create_string_buffer(size.value)
        ctx = _check(_lib.EVP_MD_CTX_new(), "EVP_MD_CTX_new")
        try:
            _check(_lib.EVP_DigestSignInit(ctx, None, _lib.EVP_sha256(), None, self._pkey) == 1,
                   "EVP_DigestSignInit")
            _check(_lib.EVP_DigestSign(ctx, signature, ctypes.byref(size), data, len(data)) == 1,
                   "EVP_DigestSign")
        finally:
            _lib.EVP_MD_CTX_free(ctx)
        return signature.raw[:size.value]

    def verify_sha256(self, data, signature):
        """True if ``signature`` (DER) is this key's ECDSA/SHA-256 signature of ``data``."""
        data, signature = bytes(data), bytes(signature)
        _lib.ERR_clear_error()
        ctx = _check(_lib.EVP_MD_CTX_new(), "EVP_MD_CTX_new")
        try:
            _check(_lib.EVP_DigestVerifyInit(ctx, None, _lib.EVP_sha256(), None, self._pkey) == 1,
                   "EVP_DigestVerifyInit")
            result = _lib.EVP_DigestVerify(ctx, signature, len(signature), data, len(data))
        finally:
            _lib.EVP_MD_CTX_free(ctx)
        _lib.ERR_clear_error()  # a bad or malformed signature queues errors; it is just "no"
        return result == 1
