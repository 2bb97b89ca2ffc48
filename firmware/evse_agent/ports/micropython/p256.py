"""ECDSA P-256 / SHA-256 in pure Python, for ports without ``cryptography`` (MicroPython).

The OCMF signer of the MicroPython port: ``Signer(private_key_int)`` offers what
``ocmf.sign_document`` needs — ``sign(data)`` -> DER signature bytes — and
``public_key_hex()`` (hex DER SubjectPublicKeyInfo, as the CPython port's FileKeySigner).
The CPython port keeps using ``cryptography``; this module is used only where it is missing.

- Curve: NIST P-256 (secp256r1), SEC 2 v2 section 2.4.2 / FIPS 186-4 D.1.2.3.
- Nonces: deterministic, RFC 6979 section 3.2 with HMAC-SHA-256 (so no random source is
  needed to sign, and the same key signs the same data identically on every platform).
- Arithmetic: Jacobian coordinates (a = -3 doubling, "dbl-2001-b"; mixed addition with an
  affine point, "madd-2007-bl", from the Explicit-Formulas Database); one modular inversion
  per signature (extended Euclid); k*G with a 4-bit fixed window over a table of 15 affine
  multiples of G built on first use (about 2 KB).
- Low-s: not enforced (OCMF and X9.62 accept either s; verifiers do not require it).

Not constant-time: Python big integers leak timing. The station key signs meter readings
on the station itself; an attacker able to time many signatures at microsecond resolution
on the controller could in principle learn about the key. Documented in the README.

Portable: only ``hashlib.sha256`` and integers (no ``hmac``, no ``int.to_bytes`` keywords,
no ``pow`` with three arguments).
"""

import hashlib
from binascii import unhexlify

# Curve parameters (SEC 2 v2, 2.4.2).
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5

# DER SubjectPublicKeyInfo header for an uncompressed P-256 point (RFC 5480):
# SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING 04 || X || Y }
SPKI_PREFIX = unhexlify("3059301306072A8648CE3D020106082A8648CE3D03010703420004")
# DER PKCS#8 PrivateKeyInfo (RFC 5208 / 5915) for P-256 without the optional public key.
PKCS8_PREFIX = unhexlify("304102010030130607" "2A8648CE3D0201" "0608" "2A8648CE3D030107"
                         "042730250201010420")
PRIME256V1_OID = unhexlify("2A8648CE3D030107")


def _to_bytes(value, length):
    out = bytearray(length)
    for i in range(length - 1, -1, -1):
        out[i] = value & 0xFF
        value >>= 8
    return bytes(out)


def _from_bytes(data):
    return int.from_bytes(data, "big")


def _inverse(a, m):
    """a**-1 mod m (m prime, a not 0 mod m), by the extended Euclidean algorithm."""
    a %= m
    if a == 0:
        raise ZeroDivisionError("0 has no inverse")
    lo, hi = 1, 0
    low, high = a, m
    while low > 1:
        ratio = high // low
        lo, hi, low, high = hi - lo * ratio, lo, high - low * ratio, low
    return lo % m


# -- points: affine (x, y) tuples, None for infinity; Jacobian (X, Y, Z) with Z = 0 at infinity

def _double(X1, Y1, Z1):
    if Z1 == 0 or Y1 == 0:
        return 0, 1, 0
    delta = Z1 * Z1 % P
    gamma = Y1 * Y1 % P
    beta = X1 * gamma % P
    alpha = 3 * (X1 - delta) * (X1 + delta) % P
    X3 = (alpha * alpha - 8 * beta) % P
    Z3 = ((Y1 + Z1) * (Y1 + Z1) - gamma - delta) % P
    Y3 = (alpha * (4 * beta - X3) - 8 * gamma * gamma) % P
    return X3, Y3, Z3


def _add_affine(X1, Y1, Z1, x2, y2):
    """(X1, Y1, Z1) + (x2, y2), the second point affine and not infinity."""
    if Z1 == 0:
        return x2, y2, 1
    Z1Z1 = Z1 * Z1 % P
    U2 = x2 * Z1Z1 % P
    S2 = y2 * Z1 * Z1Z1 % P
    H = (U2 - X1) % P
    r = 2 * (S2 - Y1) % P
    if H == 0:
        if r == 0:
            return _double(X1, Y1, Z1)
        return 0, 1, 0
    HH = H * H % P
    I = 4 * HH % P
    J = H * I % P
    V = X1 * I % P
    X3 = (r * r - J - 2 * V) % P
    Y3 = (r * (V - X3) - 2 * Y1 * J) % P
    Z3 = ((Z1 + H) * (Z1 + H) - Z1Z1 - HH) % P
    return X3, Y3, Z3


def _to_affine(X, Y, Z):
    if Z == 0:
        return None
    zi = _inverse(Z, P)
    zi2 = zi * zi % P
    return X * zi2 % P, Y * zi2 * zi % P


def _on_curve(point):
    if point is None:
        return False
    x, y = point
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x - 3 * x + B)) % P == 0


_G_TABLE = []  # [1G, 2G, ..., 15G] affine, built on first use


def _g_table():
    if not _G_TABLE:
        X, Y, Z = GX, GY, 1
        _G_TABLE.append((GX, GY))
        for _ in range(14):
            X, Y, Z = _add_affine(X, Y, Z, GX, GY)
            _G_TABLE.append(_to_affine(X, Y, Z))
    return _G_TABLE


def _mul_g(k):
    """k*G as an affine point (4-bit fixed window)."""
    table = _g_table()
    X, Y, Z = 0, 1, 0
    for shift in range(252, -1, -4):
        if Z:
            for _ in range(4):
                X, Y, Z = _double(X, Y, Z)
        digit = (k >> shift) & 15
        if digit:
            x2, y2 = table[digit - 1]
            X, Y, Z = _add_affine(X, Y, Z, x2, y2)
    return _to_affine(X, Y, Z)


def _mul(k, point):
    """k*point for an affine point (binary, left to right); Jacobian result."""
    x, y = point
    X, Y, Z = 0, 1, 0
    for shift in _bits_down(k):
        X, Y, Z = _double(X, Y, Z)
        if (k >> shift) & 1:
            X, Y, Z = _add_affine(X, Y, Z, x, y)
    return X, Y, Z


def _bits_down(k):
    """Bit positions of ``k`` from the highest set bit down to 0 (no int.bit_length here)."""
    n = 0
    while k >> (n + 32):
        n += 32
    while k >> n:
        n += 1
    return range(n - 1, -1, -1)


# -- hashing -------------------------------------------------------------------------

def _sha256(data):
    return hashlib.sha256(data).digest()


def _hmac_sha256(key, data):
    """HMAC-SHA-256 (RFC 2104); key is at most 64 bytes here."""
    if len(key) > 64:
        key = _sha256(key)
    key = key + bytes(64 - len(key))
    inner = bytes(b ^ 0x36 for b in key)
    outer = bytes(b ^ 0x5C for b in key)
    return _sha256(outer + _sha256(inner + data))


def _bits2int(data):
    """RFC 6979 2.3.2 for qlen = 256: the leftmost 256 bits as an integer."""
    value = _from_bytes(data)
    excess = len(data) * 8 - 256
    return value >> excess if excess > 0 else value


def rfc6979_nonce(d, digest):
    """The deterministic nonce k of RFC 6979 3.2 for key ``d`` and message hash ``digest``."""
    x = _to_bytes(d, 32)
    h1 = _to_bytes(_bits2int(digest) % N, 32)  # bits2octets
    v = b"\x01" * 32
    k = b"\x00" * 32
    k = _hmac_sha256(k, v + b"\x00" + x + h1)
    v = _hmac_sha256(k, v)
    k = _hmac_sha256(k, v + b"\x01" + x + h1)
    v = _hmac_sha256(k, v)
    while True:
        v = _hmac_sha256(k, v)
        candidate = _bits2int(v)
        if 1 <= candidate < N:
            return candidate
        k = _hmac_sha256(k, v + b"\x00")
        v = _hmac_sha256(k, v)


# -- ECDSA ---------------------------------------------------------------------------

def sign_digest(d, digest):
    """(r, s) of ECDSA over a SHA-256 ``digest`` with private key ``d`` (RFC 6979 nonce)."""
    e = _bits2int(digest) % N
    while True:
        k = rfc6979_nonce(d, digest)
        point = _mul_g(k)
        r = point[0] % N
        if r == 0:
            digest = _sha256(digest)  # practically unreachable (probability ~2**-256)
            continue
        s = _inverse(k, N) * (e + r * d) % N
        if s:
            return r, s
        digest = _sha256(digest)


def verify_digest(public, digest, r, s):
    """True when (r, s) is a valid signature of ``digest`` by the affine point ``public``."""
    if not (1 <= r < N and 1 <= s < N) or not _on_curve(public):
        return False
    e = _bits2int(digest) % N
    w = _inverse(s, N)
    u1 = e * w % N
    u2 = r * w % N
    g = _mul_g(u1)
    X, Y, Z = _mul(u2, public)
    if g is not None:
        X, Y, Z = _add_affine(X, Y, Z, g[0], g[1])
    point = _to_affine(X, Y, Z)
    return point is not None and point[0] % N == r


def _der_int(value):
    """DER INTEGER of a non-negative value below 2**256: minimal, with a 0 byte before a high bit."""
    body = _to_bytes(value, 33)
    start = 0
    while start < 32 and body[start] == 0 and not body[start + 1] & 0x80:
        start += 1
    body = body[start:]
    return b"\x02" + bytes([len(body)]) + body


def der_signature(r, s):
    """DER ``SEQUENCE { INTEGER r, INTEGER s }`` (X9.62), the OCMF ``SD`` bytes."""
    body = _der_int(r) + _der_int(s)
    return b"\x30" + bytes([len(body)]) + body


def parse_der_signature(der):
    """(r, s) from a DER ECDSA signature; ValueError if it is not one."""
    der = bytes(der)
    if len(der) < 8 or der[0] != 0x30 or der[1] != len(der) - 2:
        raise ValueError("not a DER ECDSA signature")
    values = []
    pos = 2
    for _ in range(2):
        if der[pos] != 0x02:
            raise ValueError("not a DER ECDSA signature")
        length = der[pos + 1]
        values.append(_from_bytes(der[pos + 2:pos + 2 + length]))
        pos += 2 + length
    if pos != len(der):
        raise ValueError("trailing bytes after the DER signature")
    return values[0], values[1]


def public_point(d):
    """The affine public point of private key ``d``."""
    if not 1 <= d < N:
        raise ValueError("a P-256 private key is an integer in 1 .. n-1")
    return _mul_g(d)


def private_key_from_der(der):
    """The private scalar of a P-256 key in PKCS#8 or SEC 1 (``EC PRIVATE KEY``) DER."""
    der = bytes(der)
    if PRIME256V1_OID not in der:
        raise ValueError("the key is not a P-256 (prime256v1) key")
    marker = der.find(b"\x02\x01\x01\x04\x20")  # ECPrivateKey: version 1, OCTET STRING(32)
    if marker < 0 or marker + 5 + 32 > len(der):
        raise ValueError("no P-256 private key in the DER data")
    d = _from_bytes(der[marker + 5:marker + 37])
    if not 1 <= d < N:
        raise ValueError("the private key is out of range")
    return d


def private_key_to_der(d):
    """PKCS#8 DER of a P-256 private key (readable by ``cryptography`` and OpenSSL)."""
    return PKCS8_PREFIX + _to_bytes(d, 32)


class Signer:
    """ECDSA P-256 / SHA-256 with the private key ``d``: the OCMF signer interface."""

    def __init__(self, d):
        self._d = d
        self._public = public_point(d)

    def sign(self, data):
        """DER-encoded ECDSA signature of ``data`` (bytes), hashed with SHA-256."""
        r, s = sign_digest(self._d, _sha256(bytes(data)))
        return der_signature(r, s)

    def verify(self, data, signature):
        r, s = parse_der_signature(signature)
        return verify_digest(self._public, _sha256(bytes(data)), r, s)

    def public_key_der(self):
        x, y = self._public
        return SPKI_PREFIX + _to_bytes(x, 32) + _to_bytes(y, 32)

    def public_key_hex(self):
        """Upper-case hex of the DER SubjectPublicKeyInfo, the form OCMF verifiers take."""
        return "".join("%02X" % b for b in self.public_key_der())
