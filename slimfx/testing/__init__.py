"""The public testing kit: hypothesis strategies for random models and pipelines, and contract checkers.

Pass authors outside slimfx use it to get property tests for a new pass almost for free::

    from hypothesis import given
    from slimfx.testing import check_contract, strategies as sst

    @given(sst.programs())
    def test_my_pass_keeps_its_contract(program):
        check_contract("my-pass", program)
"""

from slimfx.testing.contracts import ContractReport, check_contract

__all__ = ["ContractReport", "check_contract", "strategies"]


def __getattr__(name: str):
    if name == "strategies":  # lazy: hypothesis is a dev dependency
        import importlib

        return importlib.import_module("slimfx.testing.strategies")
    raise AttributeError(name)
