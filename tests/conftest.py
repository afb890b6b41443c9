import pytest

from tiny_runs import make_tiny_datasets


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A datasets root holding the tiny synthetic split, made once per test module."""
    return make_tiny_datasets(tmp_path_factory.mktemp("datasets"))
