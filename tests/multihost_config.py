"""Config file for the subprocesses of tests/test_multihost.py: `tiny_config()` of
tests/test_train.py, so the multi-process runs and the in-process reference train the same thing."""

import importlib.util
import os


def get_config(arg: str = ""):
    del arg
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_train.py")
    spec = importlib.util.spec_from_file_location("_stego_test_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_config()
