"""Command-line overrides for the config dict at the top of each script (nanoGPT style, without exec).

    config = dict(lr=1e-4, size="T", cfg_interval=(0, 1000), compile=False)
    args = parse_config(config)            # sys.argv[1:]: --lr 3e-4 --size=L --cfg-interval 100 800 --compile

Every key may be given as `--key value` or `--key=value`, dashes or underscores alike. The value is
converted to the type of the default (bool: true/false/1/0/yes/no, or a bare flag for True; a tuple or
list default takes every following value that is not an option; a None default takes a string).
An unknown key or a value of the wrong type is an error that names the key. Words that are not options
are returned as positional arguments (for scripts such as fid.py that take file names). aliases maps an old
option name to today's (a renamed key keeps working for a while).
"""
import sys

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ConfigError(ValueError):
    pass


def _convert(option, text, default):
    kind = type(default)
    if default is None or kind is str:
        return text
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"--{option}: expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{option}: expected {kind.__name__}, got {text!r}") from None


def _is_option(word):
    return word.startswith("--") and len(word) > 2


def parse_config(config, argv=None, prog=None, aliases=None):
    """Override `config` in place from argv; return the list of positional arguments.
    With argv=None (the real command line) a bad option exits with `prog: error: ...` instead of raising."""
    if argv is None:
        try:
            return parse_config(config, sys.argv[1:], prog, aliases)
        except ConfigError as e:
            sys.exit(f"{prog or sys.argv[0]}: error: {e}")
    argv = list(argv)
    positional, i = [], 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word in ("-h", "--help"):
            print(f"usage: {prog or sys.argv[0]} [--key value ...]\n")
            for key, value in config.items():
                print(f"  --{key.replace('_', '-'):24s} {value!r}")
            sys.exit(0)
        if not _is_option(word):
            positional.append(word)
            continue
        name, has_eq, inline = word[2:].partition("=")
        key = name.replace("-", "_")
        key = (aliases or {}).get(key, key)
        if key not in config:
            raise ConfigError(f"unknown option --{name} (known: {', '.join(sorted(config))})")
        default = config[key]
        if isinstance(default, (tuple, list)):
            values = inline.split(",") if has_eq else []
            while not has_eq and i < len(argv) and not _is_option(argv[i]):
                values.append(argv[i])
                i += 1
            elem = default[0] if len(default) else ""
            config[key] = type(default)(_convert(name, v, elem) for v in values if v != "")
        elif has_eq:
            config[key] = _convert(name, inline, default)
        elif isinstance(default, bool) and (i == len(argv) or _is_option(argv[i])
                                           or argv[i].lower() not in _TRUE | _FALSE):
            config[key] = True  # bare flag
        elif i < len(argv):
            config[key] = _convert(name, argv[i], default)
            i += 1
        else:
            raise ConfigError(f"--{name}: missing value")
    return positional
