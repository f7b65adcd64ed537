"""The process-wide switches behind blocked_attention() and native_kernels() restore what was set before."""

import pytest

from latentgen.nn.switch import Switch


def test_set_restores_the_previous_value_also_after_an_error():
    switch = Switch(None)
    with switch.set(True):
        assert switch.value is True
        with pytest.raises(RuntimeError):
            with switch.set(False):
                assert switch.value is False
                raise RuntimeError("inside")
        assert switch.value is True
    assert switch.value is None
