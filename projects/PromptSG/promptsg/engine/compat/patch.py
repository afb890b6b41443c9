"""``_patch``: marks a function as one of the named FastReID patches."""


def _patch(fn):
    """Mark ``fn`` as a patch named ``fn.patch_name``; ``apply_all`` runs those ``_PATCHES`` lists, each once."""
    fn.patch_name = fn.__name__.lstrip("_")
    return fn
