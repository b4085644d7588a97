"""One command-line convention for every program: absl flags and ml_collections config files.

    python -m stego_jax.<program> --config configs/<name>.py[:arg] [--config.<field>=<value> ...] [flags]

`--config file.py:arg` calls the file's `get_config(arg)`; `--config.model.dim=100` overrides one
field (any depth, typed as the field). Flags take `--name=value` or `--name value`; booleans
`--name` / `--noname`. `--help` prints a program's flags. A bad flag or a bad value is a usage
error: one line on stderr and exit status 2, no traceback. An error while running (a bad config
value, an unreadable file, a damaged checkpoint) prints one line naming it and exits 1;
`--verbose` shows its traceback (and INFO logs).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

CONVENTION = (
    "Config files: --config path/to/config.py[:arg] calls its get_config(arg); override any field\n"
    "with --config.<field>=<value> (e.g. --config.model.dim=100 --config.eval.crf=False).\n"
    "Booleans: --name / --noname. Exit status 2 on a usage error, 1 on an error while running\n"
    "(one line; --verbose for the traceback).\n"
    "With --workdir of an existing run, the run's own config.json is the config: --config and\n"
    "--config.x=y may change only what evaluation may change (eval.*, distributed.*, where the data\n"
    "live); a field that changes the model or the data is refused, naming it. Resuming training\n"
    "with changed settings (learning rates, steps, loss weights) is allowed, warned about and\n"
    "recorded in config_history.jsonl.")

_HELP = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def packaged_config(name: str) -> str:
    """Path of a config file shipped with the package (`stego_jax/configs/` in an installed wheel,
    `configs/` in a source checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"config {name!r} is not shipped with stego_jax (looked in {here}/configs)")


def define_config(fv: flags.FlagValues, argv: Sequence[str], *, default: str | None = None,
                  required: bool = True,
                  help_string: str = "experiment config file (path.py or path.py:arg)") -> None:
    """`--config` on `fv`, its `--config.<field>` overrides read from `argv`."""
    config_flags.DEFINE_config_file("config", default, help_string, flag_values=fv, lock_config=True,
                                    sys_argv=list(argv))
    if required:
        flags.mark_flag_as_required("config", flag_values=fv)


def run(program: str, doc: str, define: Callable[[flags.FlagValues, Sequence[str]], None],
        body: Callable[[flags.FlagValues, list[str]], int | None], argv: Sequence[str] | None = None,
        *, positional: int | None = 0) -> int:
    """Parse `argv` (the arguments, without the program name; default `sys.argv[1:]`) with the
    flags `define(fv, argv)` declares, then return `body(fv, positional args)`'s exit status.

    `positional=None` passes any positional arguments to `body`. `--help` prints `doc`, the convention and the flags (status 0); an unknown flag, a bad value,
    a missing required flag or a wrong number of positional arguments prints one line naming it
    (status 2).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    full = [program] + args
    fv = flags.FlagValues()
    define(fv, full)
    flags.DEFINE_bool("verbose", False, "log at INFO level and show the traceback of an error", flag_values=fv)
    if any(a in _HELP for a in args):
        print(f"usage: python -m {program} [flags]\n\n{doc.strip()}\n\n{CONVENTION}\n\n{fv.get_help()}")
        return 0
    try:
        rest = fv(full)[1:]
        if positional is not None and len(rest) != positional:
            want = f"{positional} positional argument(s)" if positional else "no positional arguments"
            raise flags.Error(f"expected {want}, got {rest}")
        if "config" in fv and fv["config"].value is not None:
            fv.config.keys()  # a config file that failed to load raises here, not mid-run
    except flags.Error as e:
        return _usage_error(program, str(e))
    except (KeyError, AttributeError) as e:
        overrides = [a.split("=")[0] for a in args if a.startswith("--config.")]
        return _usage_error(program, f"an override names a field the config does not have ({e}); "
                                     f"overrides given: {overrides}")
    except OSError as e:
        return _usage_error(program, "cannot load the config file: " + " ".join(str(e).split()))
    absl_logging.set_verbosity(absl_logging.INFO if fv.verbose else absl_logging.WARNING)
    try:
        return int(body(fv, rest) or 0)
    except flags.ValidationError as e:
        return _usage_error(program, str(e))
    except (ValueError, OSError, RuntimeError) as e:
        # Bad configs, files and checkpoints: their messages name the field or file and the fix.
        if fv.verbose:
            raise
        print(f"python -m {program}: error: {e}\n(--verbose shows the traceback)", file=sys.stderr)
        return 1


def _usage_error(program: str, message: str) -> int:
    print(f"python -m {program}: error: {message}\n(run with --help for the flags)", file=sys.stderr)
    return 2
