"""Registration hooks of ``vlmr1-plugin-npu`` (torch_npu is NOT imported here)."""

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_devices(register) -> None:
    """The ``npu`` device."""
    from vlmr1_npu.device import NPUDevice

    register(NPUDevice)
