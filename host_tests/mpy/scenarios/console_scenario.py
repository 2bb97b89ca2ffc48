"""Console command parsing: terminal bytes to lines, command name matching, the PIN hash."""

import harness
from evse_agent.console import CommandError, LineEditor, match, pin_hash, pin_matches, pin_problem


def _lines(data, max_line=32):
    editor = LineEditor(max_line)
    out = []
    for byte in data:
        result = editor.push(byte)
        if result is not None:
            out.append(list(result))
    return {"lines": out, "echo": "".join("%02X" % b for b in editor.echo)}


async def main():
    harness.emit("plain", _lines(b"meter\r\nstatus\rjournal stats\n"))
    harness.emit("editing", _lines(b"metre\x7f\x7f\x7fer\x08\x08er\r\x00session\x1b[A\x1bOB list\r\n"))
    harness.emit("controls", _lines(b"ev\x01\x02ents\x9b\r"))
    harness.emit("utf8", _lines("m\u00e9ter \u20ac\r".encode() + b"bad \xc3\x28 \xff\r"))
    harness.emit("too_long", _lines(b"x" * 40 + b"\r" + b"ok\r"))
    await harness.checkpoint("lines")
    names = ("meter", "measure", "session", "status", "journal", "help")
    results = []
    for word in ("meter", "ME", "mea", "s", "se", "jour", "x", "HELP"):
        try:
            results.append(match(word, names))
        except CommandError as error:
            results.append("error: %s" % error)
    harness.emit("match", results)
    salt = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    stored = pin_hash("1234-abcd", salt)
    harness.emit("pin", [stored, pin_matches("1234-abcd", stored), pin_matches("1234-abce", stored),
                         pin_problem("12"), pin_problem("12 34"), pin_problem("x" * 40)])
    await harness.checkpoint("commands")


if __name__ == "__main__":
    harness.run(main)
