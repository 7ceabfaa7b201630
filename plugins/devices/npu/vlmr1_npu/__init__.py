"""vlmr1 device plugin for Huawei Ascend NPUs (torch-npu, HCCL). torch_npu is imported lazily."""

from vlmr1_npu.device import NPUDevice

__all__ = ["NPUDevice"]
