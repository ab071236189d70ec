import pytest


@pytest.fixture
def img(tmp_path):
    """Path for a new image inside the test's temp dir."""
    return str(tmp_path / "disk.vdk")
