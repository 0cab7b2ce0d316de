"""
The command line of ral.py and distill.py, nanoGPT style: a table of options (name: (default, meaning)), then
config files (plain python assignments), then --key=value overrides. Every mistake is a UsageError, which
`cli` turns into one line on stderr and exit status 2; --help lists every option with its default and meaning.
"""
import ast
import difflib
import importlib
import importlib.util
import os
import sys
import types


class UsageError(ValueError):
    """A user's mistake in options, files or folders: one line on stderr, exit status 2 (see cli)."""


def usage(options, doc):
    rows = [(f"--{k}={v!r}", meaning) for k, (v, meaning) in options.items()]
    width = max(len(flag) for flag, _ in rows) + 2
    return (doc.strip() + "\n\noptions (default and meaning; config files first, then --key=value):\n" +
            "\n".join(f"  {flag.ljust(width)}{meaning}" for flag, meaning in rows))


def typed(key, value, default):
    """value as the type of the default (an int where a float is expected is fine), else a UsageError."""
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        raise UsageError(f"--{key}: expected {type(default).__name__}, got {value!r}")
    return value


def unknown(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown option --{key}" + (f" (did you mean --{close[0]}?)" if close else "; see --help")


def parse(argv, options, doc):
    """The config: defaults, then each config file, then each --key=value, in order. --help prints and exits."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(options, doc))
        sys.exit(0)
    cfg = {k: default for k, (default, _) in options.items()}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key not in cfg:
                raise UsageError(unknown(key, cfg))
            if not eq:
                raise UsageError(f"--{key} needs a value: --{key}=...")
            try:
                value = ast.literal_eval(text)      # numbers, True/False, lists; otherwise a plain string
            except (ValueError, SyntaxError):
                value = text
            cfg[key] = typed(key, value, cfg[key])
        elif "=" in arg and not arg.endswith(".py"):
            raise UsageError(f"{arg!r} is not a config file; options take two dashes: --{arg}")
        elif not os.path.isfile(arg):
            raise UsageError(f"config file not found: {arg}")
        else:
            scope = {}     # a preset may import modules and find files beside itself (__file__)
            exec(open(arg).read(), {"__file__": os.path.abspath(arg)}, scope)
            for key, value in scope.items():
                if isinstance(value, types.ModuleType):
                    continue
                if key not in cfg:
                    raise UsageError(f"{arg}: {unknown(key, cfg)}")
                cfg[key] = typed(key, value, cfg[key])
    return cfg


def import_function(spec, option="--reward"):
    """'module:function' (a module on the path, or a .py file) -> the function, else a UsageError naming option."""
    module, colon, name = spec.partition(":")
    if not colon or not module or not name:
        raise UsageError(f"{option}={spec!r}: expected module:function (e.g. my_rewards:exact_match)")
    try:
        if module.endswith(".py"):
            found = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
            if found is None or not os.path.isfile(module):
                raise ImportError(f"no such file {module}")
            loaded = importlib.util.module_from_spec(found)
            found.loader.exec_module(loaded)
        else:
            loaded = importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"{option}={spec!r}: cannot import {module}: {e}") from None
    fn = getattr(loaded, name, None)
    if not callable(fn):
        raise UsageError(f"{option}={spec!r}: {module} has no function {name}")
    return fn


def cli(main, argv):
    """Run main(argv); a UsageError ends in one line on stderr and exit status 2, never a traceback."""
    try:
        main(argv)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
