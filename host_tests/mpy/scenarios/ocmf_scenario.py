"""OCMF: payload text, time stamps, signing with the portable P-256 signer, parsing back."""

import harness
from fakes import signer
from evse_agent.ocmf import (Identification, OcmfReading, build_payload, ocmf_time, parse_document,
                             sign_document)


async def main():
    harness.emit("times", [ocmf_time(1795000000, True), ocmf_time(1795000000.5, False),
                           ocmf_time(0, True), ocmf_time(4102444799, True)])
    begin = OcmfReading(1795000000, True, "B", 1234567)
    end = OcmfReading(1795003600, True, "E", 1245678)
    fiscal = OcmfReading(1795001800, False, None, 1240000)
    payloads = [
        build_payload("evse-agent", "mpy-001", "0.1.0", "T1", "Eastron", "SDM630", "12345678", [begin]),
        build_payload("evse-agent", "mpy-001", "0.1.0", "T2", "Eastron", "SDM630", "12345678", [begin, end],
                      identification=Identification(True, "VERIFIED", ["RFID_PLAIN", "OCPP_AUTH"],
                                                    "ISO14443", "04A2B3C4D5E6F7"),
                      charge_point_id="DE*ABC*E123*1"),
        build_payload("evse-agent", "mpy-001", "0.1.0", "F1", "ABB", "B23", "UNKNOWN", [fiscal],
                      meter_firmware="1.2.3"),
    ]
    for payload in payloads:
        harness.emit("payload", payload)
    await harness.checkpoint("payloads")
    errors = []
    for make in (lambda: build_payload("a", "b", "c", "T01", "v", "m", "1", [begin]),
                 lambda: build_payload("a", "b", "c", "X1", "v", "m", "1", [begin]),
                 lambda: build_payload("a", "b", "c", "F1", "v", "m", "1", [begin]),
                 lambda: build_payload("a", "b|x", "c", "T1", "v", "m", "1", [begin]),
                 lambda: build_payload("a", "b", "c", "T1", "v", "m", "", [begin]),
                 lambda: build_payload("a", "b", "c", "T1", "v", "m", "1", []),
                 lambda: OcmfReading(1, True, "Q", 1),
                 lambda: OcmfReading(1, True, "B", -5),
                 lambda: OcmfReading(1, True, "B", 1.5),
                 lambda: OcmfReading(1, True, "B", None)):
        try:
            make()
            errors.append("accepted")
        except ValueError as error:
            errors.append(str(error))
    harness.emit("errors", errors)
    await harness.checkpoint("errors")
    station = signer()
    harness.emit("public_key", station.public_key_hex())
    for payload in payloads:
        document = sign_document(payload, station)
        parsed, signature, text = parse_document(document)
        if text != payload:
            raise AssertionError("parse_document did not give back the signed payload text")
        if not station.verify(text.encode(), bytes.fromhex(signature["SD"]) if hasattr(bytes, "fromhex")
                              else __import__("binascii").unhexlify(signature["SD"])):
            raise AssertionError("the signature does not verify")
        harness.emit("document", document)
        harness.emit("parsed", {"PG": parsed["PG"], "RD": parsed["RD"], "SA": signature["SA"]})
        await harness.checkpoint("document")
    bad = []
    for text in ("OCMF|{}", "XOCMF|{}|{}", "OCMF|{]|{\"SD\":\"00\"}", "OCMF|{}|{\"SD\":\"zz\"}", "OCMF|[]|{\"SD\":\"00\"}"):
        try:
            parse_document(text)
            bad.append("accepted")
        except ValueError as error:
            bad.append(str(error).split(" (")[0])
    harness.emit("parse_errors", bad)


if __name__ == "__main__":
    harness.run(main)
