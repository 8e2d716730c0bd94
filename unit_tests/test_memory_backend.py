import pytest

from rdzv_common.memory import MemoryBackend, MemoryStore
from unit_tests.backend_contract import BackendContract


class TestMemoryBackend(BackendContract):
    fences_withdrawn = True
    fences_member = True

    @pytest.fixture
    def make_backend(self):
        store = MemoryStore()
        return lambda run_id: MemoryBackend(store, run_id)
