"""P-256 signer: RFC 6979 P-256/SHA-256 vectors (A.2.5), signing time, DER round trips."""

import hashlib
import time

import harness
from evse_agent.ports.micropython import p256

# RFC 6979 appendix A.2.5 (ECDSA, 256 bits (prime field)), key pair and SHA-256 signatures.
KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
PUBLIC = (0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6,
          0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299)
VECTORS = (
    (b"sample", 0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60,
     0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
     0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8),
    (b"test", 0xD16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0,
     0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
     0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083),
)


def _ms():
    if hasattr(time, "ticks_ms"):
        return time.ticks_ms()
    return int(time.time() * 1000)


def _us():
    if hasattr(time, "ticks_us"):
        return time.ticks_us()
    return int(time.time() * 1000000)


async def main():
    if p256.public_point(KEY) != PUBLIC:
        raise AssertionError("public key of the RFC 6979 key is wrong")
    for message, k, r, s in VECTORS:
        digest = hashlib.sha256(message).digest()
        if p256.rfc6979_nonce(KEY, digest) != k:
            raise AssertionError("RFC 6979 nonce for %r is wrong" % message)
        if p256.sign_digest(KEY, digest) != (r, s):
            raise AssertionError("RFC 6979 signature for %r is wrong" % message)
        if not p256.verify_digest(PUBLIC, digest, r, s):
            raise AssertionError("RFC 6979 signature for %r does not verify" % message)
        harness.emit("vector", {"message": message.decode(), "r": "%064X" % r, "s": "%064X" % s})
    signer = p256.Signer(KEY)
    harness.emit("public_key", signer.public_key_hex())
    await harness.checkpoint("signer")
    count = 4
    started, started_us = _ms(), _us()
    signatures = []
    for i in range(count):
        signatures.append(signer.sign(b"OCMF payload %d" % i))
    elapsed, elapsed_us = _ms() - started, _us() - started_us
    if hasattr(time, "ticks_diff"):  # the tick counters wrap
        elapsed, elapsed_us = time.ticks_diff(_ms(), started), time.ticks_diff(_us(), started_us)
    for i, signature in enumerate(signatures):
        if not signer.verify(b"OCMF payload %d" % i, signature):
            raise AssertionError("own signature %d does not verify" % i)
        if signer.verify(b"OCMF payload %d!" % i, signature):
            raise AssertionError("signature %d verifies for other data" % i)
        harness.emit("signature", "".join("%02X" % b for b in signature))
    if p256.private_key_from_der(p256.private_key_to_der(KEY)) != KEY:
        raise AssertionError("PKCS#8 round trip lost the key")
    await harness.checkpoint("signed")
    print("timing sign_ms %d" % (elapsed // count))
    print("timing sign_ms_x100 %d" % (elapsed_us // (10 * count)))


if __name__ == "__main__":
    harness.run(main)
