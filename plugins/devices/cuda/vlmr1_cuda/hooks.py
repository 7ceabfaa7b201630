"""Registration hooks of ``vlmr1-plugin-cuda`` (nothing heavy is imported here)."""

from core.hookspecs import hookimpl


@hookimpl
def vlmr1_register_devices(register) -> None:
    """The ``cuda`` device."""
    from vlmr1_cuda.device import CUDADevice

    register(CUDADevice)
