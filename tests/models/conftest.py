import pytest

from tests.models.utils import tiny_configs


@pytest.fixture(params=["xlstm_blocks", "xlstm_large", "llama"])
def tiny_cfg(request):
    return tiny_configs()[request.param]
