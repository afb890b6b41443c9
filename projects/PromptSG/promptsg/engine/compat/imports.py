"""The names FastReID imports that Python 3.10+ and torch 2.x no longer have."""
import collections
import collections.abc
import sys
import types

from .patch import _patch


# --------------------------------------------------------------------------------------------
# 1-2. Import failures: ``from collections import Mapping`` and ``from torch._six import string_classes``
# --------------------------------------------------------------------------------------------
@_patch
def _import_aliases():
    """Restore the two names FastReID imports that no longer exist (Python 3.10+, torch 2.x)."""
    if not hasattr(collections, "Mapping"):
        collections.Mapping = collections.abc.Mapping
    if "torch._six" not in sys.modules:
        six = types.ModuleType("torch._six")
        six.string_classes = (str, bytes)
        sys.modules["torch._six"] = six
