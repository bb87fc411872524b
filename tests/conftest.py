"""The test-only toy task (tests/toy_task.py) is registered for the in-process tool runs."""
from tests.run_tool import register_toy

register_toy()
