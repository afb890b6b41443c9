import os

import pytest

from tiny_runs import make_tiny_datasets


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A datasets root holding the tiny synthetic split, made once per test module."""
    return make_tiny_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session", autouse=True)
def image_check_cache(tmp_path_factory):
    """The start-up image check remembers verified images in $PROMPTSG_CACHE_DIR: the tests (and
    the runs they start, which inherit the environment) keep theirs out of the user's cache."""
    cache = str(tmp_path_factory.mktemp("promptsg-cache"))
    previous = os.environ.get("PROMPTSG_CACHE_DIR")
    os.environ["PROMPTSG_CACHE_DIR"] = cache
    yield cache
    if previous is None:
        os.environ.pop("PROMPTSG_CACHE_DIR", None)
    else:
        os.environ["PROMPTSG_CACHE_DIR"] = previous
