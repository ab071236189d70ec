import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def img(tmp_path):
    """Path for a new image inside the test's temp dir."""
    return str(tmp_path / "disk.vdk")
