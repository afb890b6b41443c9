"""PromptSG (CVPR 2024) for FastReID.

Importing this package patches the installed FastReID for today's stack (``compat``) and
registers PromptSG's components in FastReID's registries.
"""
from . import compat  # noqa: F401  (must come first: FastReID does not import without it)
from .config import add_promptsg_config

__all__ = ["add_promptsg_config"]
