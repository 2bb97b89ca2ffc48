"""Console command ``config``: show, get, set and save board settings, checked against the board schema.

Bound to ``Console`` when a command of this group is first used (see the package
docstring): ``self`` is the console."""

import json

from .. import log
from ..config import ConfigError, apply_override, closest, field_at, is_live, schema, setting_paths, validate
from . import CommandError, MASKED, _no_args, _shown, match


async def cmd_config(self, args):
    if not args:
        raise CommandError("usage: config show [section] | get <setting> | set <setting> <value> | save")
    sub = match(args[0], ("show", "get", "set", "save"), "config command")
    rest = args[1:]
    if sub == "show":
        self._config_show(rest)
    elif sub == "get":
        if len(rest) != 1:
            raise CommandError("usage: config get <setting>, e.g. config get mqtt.port")
        self._config_get(self._setting(rest[0]))
    elif sub == "set":
        self._need_unlock("config set")
        if len(rest) < 2:
            raise CommandError("usage: config set <setting> <value>, e.g. config set mqtt.port 1884")
        self._config_set(self._setting(rest[0]), " ".join(rest[1:]))
    else:
        self._need_unlock("config save")
        _no_args(rest, "config save")
        self._config_save()

def _setting(self, word):
    """The setting ``word`` names: a full dotted path, or the beginning of only one."""
    paths = [path for path, _ in setting_paths()]
    if word in paths:
        return word
    found = [path for path in paths if path.startswith(word)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CommandError("ambiguous setting %s: could be %s%s" % (
            _shown(word), ", ".join(found[:4]), ", ..." if len(found) > 4 else ""))
    hint = closest(word, paths)
    raise CommandError("unknown setting %s%s" % (_shown(word), "; did you mean %s?" % hint if hint else ""))

def _shown_value(self, path, value):
    if path in MASKED and value is not None:
        return "(set)"
    return json.dumps(value)

def _file_value(self, path):
    """The value ``config save`` would write (None when the file does not name it)."""
    node = self.board.doc if self.board is not None else {}
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node

def _config_show(self, args):
    if len(args) > 1:
        raise CommandError("usage: config show [section]")
    fields = schema()
    sections = tuple(name for name in fields if isinstance(fields[name], dict))
    prefix = match(args[0], sections, "section") + "." if args else ""
    # Sorted by name: MicroPython's dicts do not keep the schema's order.
    for path in sorted(path for path, _ in setting_paths()):
        if not path.startswith(prefix):
            continue
        line = "%s = %s" % (path, self._shown_value(path, _get(self.agent.config, path)))
        if path in self.needs_restart:
            line += "   (after restart: %s)" % self._shown_value(path, self._file_value(path))
        self._say(line)
    if self.unsaved:
        self._say("not saved yet: %s ('config save' writes the board file)" % ", ".join(self.unsaved))

def _config_get(self, path):
    field = field_at(path)
    self._say("%s = %s" % (path, self._shown_value(path, _get(self.agent.config, path))))
    if field.help:
        self._say("  " + field.help)
    rule = [{str: "text", int: "integer", float: "number", bool: "true/false", list: "list"}[field.kind]]
    if field.choices is not None:
        rule.append("one of " + ", ".join(json.dumps(c) for c in field.choices))
    if field.minimum is not None or field.maximum is not None:
        rule.append("%s .. %s" % ("" if field.minimum is None else field.minimum,
                                  "" if field.maximum is None else field.maximum))
    if field.nullable:
        rule.append("or null")
    rule.append("applies at once" if self._live(path) else "needs a restart")
    self._say("  " + ", ".join(rule))
    if path in self.needs_restart:
        self._say("  after restart: %s" % self._shown_value(path, self._file_value(path)))

def _live(self, path):
    return is_live(path)

def _config_set(self, path, text):
    if self.board is None:
        raise CommandError("this port keeps no board file to change")
    assignment = path + "=" + text
    file_doc = json.loads(json.dumps(self.board.doc))
    try:
        apply_override(file_doc, assignment)
        running = json.loads(json.dumps(file_doc))
        for override in self.board.overrides:
            if override.split("=", 1)[0].strip() != path:
                apply_override(running, override)
        value = _get(validate(running), path)
    except ConfigError as error:
        raise CommandError(str(error))
    self.board.doc = file_doc
    if path not in self.unsaved:
        self.unsaved.append(path)
    log.info("console: config set %s = %s" % (path, self._shown_value(path, value)))
    if self._apply(path, value):
        if path in self.needs_restart:
            self.needs_restart.remove(path)
        self._say("%s = %s: in use now; 'config save' keeps it" % (path, self._shown_value(path, value)))
        return
    if path not in self.needs_restart:
        self.needs_restart.append(path)
    self._say("%s = %s: needs a restart ('config save', then 'restart')" % (path, self._shown_value(path, value)))

def _apply(self, path, value):
    """Use a setting now where the schema marks it live (the console's own through the
    lock's and the line editor's setters, the rest by the agent); False when it needs a
    restart."""
    if not is_live(path):
        return False
    if path == "console.lock_after_s":
        self.lock.set_lock_after(value)
    elif path == "console.max_line":
        self.editor.set_max_line(value)
    elif path == "console.pin_hash":
        self.lock.set_pin_hash(value)
    return self.agent.apply_setting(path, value)

def _config_save(self):
    if self.board is None:
        raise CommandError("this port keeps no board file to save")
    try:
        validate(json.loads(json.dumps(self.board.doc)))
    except ConfigError as error:
        raise CommandError("not saved, the board file would not load: %s" % error)
    try:
        backup = self.board.save(self.board.doc)
    except OSError as error:
        raise CommandError("cannot write %s: %s" % (self.board.path, error))
    log.info("console: saved the board file %s" % self.board.path)
    self._say("saved %s (the previous version is %s)" % (self.board.path, backup))
    overridden = [o.split("=", 1)[0].strip() for o in self.board.overrides]
    masked = [path for path in self.unsaved if path in overridden]
    if masked:
        self._say("note: the command line also sets %s: at each start its value wins" % ", ".join(masked))
    self.unsaved = []
    if self.needs_restart:
        self._say("restart to use: %s" % ", ".join(self.needs_restart))


def _get(doc, path):
    node = doc
    for part in path.split("."):
        node = node[part]
    return node


METHODS = (cmd_config, _setting, _shown_value, _file_value, _config_show, _config_get, _live,
    _config_set, _apply, _config_save)
