"""Console command ``id``: RFID reader, allow-list, last taps.

``id`` shows the reader's state and counters, the allow-list and where it came from, and
the last tag; ``id allow <UID>`` / ``id deny <UID>`` change the running allow-list (needs
unlock; until restart, or until the backend's retained list arrives again: put lasting
entries in the board file's ``identification.allow_list`` or the backend's topic).
Bound to ``Console`` when the command is first used (see the package docstring): ``self``
is the console.
"""

from . import CommandError, match


async def cmd_id(self, args):
    """``id [allow|deny <UID>]``; CommandError for a bad line."""
    console = self
    desk = console.agent.identification
    if desk is None:
        raise CommandError("this station has no identification reader (identification.enabled is false)")
    if not args:
        _show(console, desk)
        return
    sub = match(args[0], ("allow", "deny"), "id command")
    console._need_unlock("id " + sub)
    if len(args) != 2:
        raise CommandError("usage: id %s <UID>, e.g. id %s 04A1B2C3D4E5F6" % (sub, sub))
    try:
        uid = desk.allow(args[1], "console") if sub == "allow" else desk.deny(args[1], "console")
    except ValueError as error:
        raise CommandError(str(error))
    console._say("%s %s: %d tag(s) on the allow-list until restart" % (
        "allowed" if sub == "allow" else "removed", uid, len(desk.allowed)))


def _show(console, desk):
    status = desk.status()
    reader = status["reader"] or {}
    online = reader.get("online")
    last = status["last_tag"]
    console._table((
        ("reader", "%s, firmware %s" % ("online" if online else "NOT ANSWERING" if online is False else "starting",
                                        reader.get("firmware") or "?")),
        ("polls", "%d, taps %d, repeats %d" % (reader.get("polls", 0), reader.get("taps", 0),
                                               reader.get("repeats", 0))),
        ("faults", "timeouts %d, bad frames %d, bad answers %d, error frames %d" % (
            reader.get("timeouts", 0), reader.get("bad_frames", 0), reader.get("bad_answers", 0),
            reader.get("error_frames", 0))),
        ("last error", reader.get("last_error") or "none"),
        ("allow-list", "%d tag(s) from the %s" % (len(status["allow_list"]), status["allow_list_source"])),
        ("sessions", "%d identified, %d tap(s) unlisted, %d too early" % (
            status["bound"], status["unlisted"], status["expired"])),
        ("last tag", "none" if last is None else "%s %s at %s" % (last["uid"], last["level"], last["tapped"])),
        ("waiting", status["waiting"] or "none"),
    ))
    for uid in status["allow_list"]:
        console._say("  " + uid)


METHODS = (cmd_id,)
